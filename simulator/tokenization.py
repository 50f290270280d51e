"""Tokenization that gives the token ids vLLM gives for the same model directory.

vLLM encodes completion prompts with add_special_tokens=True, and chat prompts by rendering the
chat template like transformers' apply_chat_template and encoding with add_special_tokens=False.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer, processors

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# vLLM rejects these in chat_template_kwargs (or they clash with the conversation itself).
_RESERVED_KWARGS = frozenset({"chat_template", "tokenize", "messages", "conversation"})
# What a template's own code can raise (1 // 0, "a" + 1, a macro calling itself...): vLLM
# answers 400 for these, as for template syntax errors.
_RENDER_ERRORS = (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, RecursionError)


class ChatTemplateError(ValueError):
    """The chat request cannot be rendered (vLLM answers 400)."""


class _GenerationTag(jinja2.ext.Extension):
    # transformers accepts {% generation %}...{% endgeneration %} (assistant masks); render as-is.
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _tojson(
    x: Any,  # whatever the template passes; json.dumps refuses what is not JSON
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's tojson HTML-escapes and sorts keys; transformers swaps in plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
)
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


@lru_cache(maxsize=64)  # model templates are compiled once; per-request overrides stay bounded
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e
    except RecursionError as e:  # nesting deeper than the parser's recursion allows
        raise ChatTemplateError("chat template does not compile: nested too deeply") from e


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or AddedToken dicts.
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _flatten_content(content: Any, i: int) -> str:
    # vLLM joins text parts with "\n" for templates that expect string content.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"messages[{i}].content must be a string or a list of content parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(
                f"messages[{i}].content[{j}]: unsupported content part type {kind!r}; "
                "only {'type': 'text', 'text': ...} parts are supported"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(calls: Any, i: int) -> list[Any]:
    # vLLM parses JSON-string arguments into dicts, which tool-use templates expect.
    if not isinstance(calls, list):
        raise ChatTemplateError(f"messages[{i}].tool_calls must be a list")
    calls = copy.deepcopy(calls)
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise ChatTemplateError(f"messages[{i}].tool_calls[{j}] needs a 'function' object")
        args = fn.get("arguments") or {}
        try:
            fn["arguments"] = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError as e:
            raise ChatTemplateError(
                f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}"
            ) from e
    return calls


def _conversation(messages: Any) -> list[dict[str, Any]]:
    # Mirrors vLLM's message parsing: keeps only the fields it passes to the template.
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{i}].role must be a string, got {role!r}")
        msg: dict[str, Any] = {"role": role, "content": _flatten_content(m.get("content"), i)}
        if role == "assistant":
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
            reasoning = m.get("reasoning") or m.get("reasoning_content")
            if reasoning is not None:
                msg["reasoning"] = msg["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _longest_token_bytes(tok: Tokenizer, spec: dict[str, Any]) -> int | None:
    """The most bytes of text one token can stand for, where that is known: no normalizer
    (one could delete characters) and a byte-level pre-tokenizer, alone or after splits that
    keep every character (GPT-2, Llama 3, Qwen). A byte-level vocabulary entry is one
    character per byte; an added token is its text; UTF-8 length bounds both."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = {s.get("type") for s in steps}
    drops = any(s.get("type") == "Split" and s.get("behavior") == "Removed" for s in steps)
    if spec.get("normalizer") is not None or drops or "ByteLevel" not in kinds:
        return None
    if not kinds <= {"ByteLevel", "Split"}:
        return None
    return max(len(t.encode("utf-8")) for t in tok.get_vocab(with_added_tokens=True))


def _cut_after_final(rendered: str, final: str) -> str:
    # transformers' continue_final_message: end the prompt right after the final message's text.
    if final.strip() not in rendered:
        raise ChatTemplateError(
            "continue_final_message is set but the final message's content "
            "does not appear in the rendered chat template"
        )
    loc = rendered.rindex(final.strip())
    if rendered[loc : loc + len(final.lstrip())] == final:
        return rendered[: loc + len(final.lstrip())]
    return rendered[: loc + len(final.strip())]


class ModelTokenizer:
    """The tokenizer and chat template of one model directory."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {model_dir}")
        self._tok = Tokenizer.from_file(str(tok_file))
        tc = _read_json(model_dir / "tokenizer_config.json")
        config = _read_json(model_dir / "config.json")

        self.special_tokens = {k: s for k in _SPECIAL_KEYS if (s := _token_content(tc.get(k)))}
        # transformers registers every configured special token as a special added token (new id
        # if missing), so e.g. "<s>" in a prompt is matched whole even if only in the BPE vocab.
        extra = tc.get("additional_special_tokens") or tc.get("extra_special_tokens") or []
        extra = [_token_content(t) for t in extra] if isinstance(extra, list) else []
        self._tok.add_special_tokens(
            [
                AddedToken(s, special=True, normalized=False)
                for s in [*self.special_tokens.values(), *extra]
                if s
            ]
        )
        ids = {k: self._tok.token_to_id(s) for k, s in self.special_tokens.items()}
        bos = ids.get("bos_token", config.get("bos_token_id"))
        eos = ids.get("eos_token", config.get("eos_token_id"))
        self.bos_token_id: int | None = bos if isinstance(bos, int) else None
        self.eos_token_id: int | None = eos if isinstance(eos, int) else None
        added = self._tok.get_added_tokens_decoder()
        self.special_token_ids = frozenset(
            {i for i, t in added.items() if t.special} | {i for i in ids.values() if i is not None}
        )
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self._longest_token_bytes = _longest_token_bytes(self._tok, _read_json(tok_file))
        text_config = config.get("text_config") or {}
        self.max_position_embeddings: int | None = config.get(
            "max_position_embeddings", text_config.get("max_position_embeddings")
        )

        if "add_bos_token" in tc or "add_eos_token" in tc:
            self._set_post_processor(bool(tc.get("add_bos_token")), bool(tc.get("add_eos_token")))

        templates = tc.get("chat_template")
        if isinstance(templates, list):
            self._templates = {t["name"]: t["template"] for t in templates}
        else:
            self._templates = {"default": templates} if isinstance(templates, str) else {}
        jinja_file = model_dir / "chat_template.jinja"  # newer transformers save it here
        if jinja_file.is_file():
            self._templates["default"] = jinja_file.read_text(encoding="utf-8")

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # transformers (v5) rebuilds the post-processor when tokenizer_config sets these flags.
        # Only single sequences are ever encoded here, so the pair template is left default.
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        pre = [(bos, self.bos_token_id)] if add_bos and bos else []
        post = [(eos, self.eos_token_id)] if add_eos and eos else []
        single = " ".join([*(f"{t}:0" for t, _ in pre), "$A:0", *(f"{t}:0" for t, _ in post)])
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=pre + post
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str] | None) -> ModelTokenizer:
        return cls(Path(path) if path is not None else DEFAULT_MODEL_DIR)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it), so a long text
        # encoded in a thread leaves the event loop running.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def tokens_at_least(self, text: str) -> int:
        """A lower bound on len(encode(text)), without encoding it (0 where none is known).

        Encoding costs about 150 bytes of memory per byte of text and holds the event loop, so
        a 30 MiB prompt took minutes and 4 GB; a prompt this bound already puts over the
        context is refused without it. Each token covers at most its longest byte length of
        text, and a character is at least one byte."""
        if self._longest_token_bytes is None:
            return 0
        return -(-len(text) // self._longest_token_bytes)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def _template_source(self, override: str | None, tools: list | None) -> str:
        if override is not None:
            return self._templates.get(override, override)  # a name selects a named template
        # transformers picks the "tool_use" template when tools are given, else "default".
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        if name in self._templates:
            return self._templates[name]
        raise ChatTemplateError(
            f"model directory {self.model_dir} has no chat template (tokenizer_config.json has "
            f"{sorted(self._templates) or 'no chat_template'}); pass chat_template in the request"
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> str:
        kwargs = dict(chat_template_kwargs or {})
        if reserved := sorted(_RESERVED_KWARGS & kwargs.keys()):
            raise ChatTemplateError(f"chat_template_kwargs must not set {reserved}")
        # vLLM merges chat_template_kwargs over the request's own fields, so they win.
        add_generation_prompt = kwargs.pop("add_generation_prompt", add_generation_prompt)
        continue_final_message = kwargs.pop("continue_final_message", continue_final_message)
        tools = kwargs.pop("tools", tools)
        documents = kwargs.pop("documents", None)
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be true"
            )
        conversation = _conversation(messages)
        if continue_final_message and not conversation:
            raise ChatTemplateError("continue_final_message needs at least one message")
        template = _compile(self._template_source(chat_template, tools))
        # Unset special tokens stay undefined (render as ""), as in transformers.
        variables = {
            **self.special_tokens,
            **kwargs,
            "messages": conversation,
            "tools": tools,
            "documents": documents,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            rendered = template.render(**variables)
        except ChatTemplateError:
            raise  # raise_exception() in the template: its message as written
        except _RENDER_ERRORS as e:
            raise ChatTemplateError(
                f"chat template failed to render: {type(e).__name__}: {e}"
            ) from e
        if continue_final_message:
            rendered = _cut_after_final(rendered, conversation[-1]["content"])
        return rendered

    @cached_property
    def _generation_ids(self) -> tuple[int, ...]:
        candidates = [i for i in range(self.vocab_size) if i not in self.special_token_ids]
        texts = self._tok.decode_batch([[i] for i in candidates], skip_special_tokens=False)
        return tuple(
            i
            for i, t in zip(candidates, texts, strict=True)
            if t and t.isprintable() and "\ufffd" not in t
        )

    def generation_token_ids(self) -> list[int]:
        return list(self._generation_ids)
