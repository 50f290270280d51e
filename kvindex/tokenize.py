"""Prompt → token ids exactly as vLLM computes them, for looking prompts up in the index.

Written apart from simulator/tokenization.py on purpose: the simulator stands alone like a real
engine, so a tokenization bug on either side shows up as index misses instead of hiding
behind shared code. Completions encode with special tokens; chats render the model's chat
template the way Hugging Face transformers does and encode without them (the template carries
the BOS), which is what vLLM does.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class PromptError(ValueError):
    """The body cannot be turned into tokens (bad prompt, bad messages, template error)."""


def _raise(message: str) -> None:
    raise PromptError(f"chat template raised: {message}")


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
)
_ENV.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
    x, ensure_ascii=False, indent=indent
)
_ENV.globals["raise_exception"] = _raise
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _flat(messages: Any) -> list[dict]:
    """Messages with text parts joined by newlines, as vLLM gives string-content templates."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise PromptError(f"messages[{i}] needs a string 'role'")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            texts = [
                p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"
            ]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise PromptError(f"messages[{i}]: only text content parts are supported")
            m["content"] = "\n".join(texts)
        elif content is None:
            m["content"] = ""
        elif not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string or a list of parts")
        out.append(m)
    return out


class PromptTokenizer:
    def __init__(
        self, model_dir: Path, cache_entries: int = 256, cache_tokens: int = 2_000_000
    ) -> None:
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.special = {k: v for k in SPECIAL if (v := _content(cfg.get(k)))}
        # transformers matches configured special tokens whole, even if only in the BPE vocab.
        self._tok.add_special_tokens(
            [AddedToken(v, special=True, normalized=False) for v in self.special.values()]
        )
        template = cfg.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self._template = _ENV.from_string(template) if isinstance(template, str) else None
        # Prefix cache: text → ids of its encoding without special tokens, LRU-bounded.
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_entries = cache_entries
        self._cache_tokens = cache_tokens
        self._cached_tokens = 0
        self.hits = self.misses = 0

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> PromptTokenizer:
        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        return cls(path)

    def tokens_for(self, api: str, body: dict) -> list[int]:
        if api == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return self._encode(prompt, special=True)
            if (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            ):
                return list(prompt)
            raise PromptError("'prompt' must be a string or a list of token ids")
        if api == "chat":
            return self._encode(self._render(body), special=False)
        raise PromptError(f"no prompt tokens for API {api!r}")

    def _render(self, body: dict) -> str:
        if self._template is None:
            raise PromptError("the model directory has no chat template")
        variables: dict[str, Any] = {
            "messages": _flat(body.get("messages")),
            "tools": body.get("tools"),
            "documents": None,
            "add_generation_prompt": body.get("add_generation_prompt", True),
            **self.special,
        }
        kwargs = body.get("chat_template_kwargs")
        if isinstance(kwargs, dict):
            variables.update({k: v for k, v in kwargs.items() if k != "messages"})
        try:
            return self._template.render(**variables)
        except PromptError:
            raise
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            raise PromptError(f"chat template failed: {exc}") from exc

    def _encode(self, text: str, *, special: bool) -> list[int]:
        try:
            if special:
                return self._tok.encode(text, add_special_tokens=True).ids
            return self._cached(text)
        except TypeError as exc:  # lone surrogates and the like
            raise PromptError(f"prompt text cannot be tokenized: {exc}") from exc

    def _cached(self, text: str) -> list[int]:
        """Whole-text LRU: a rendered chat is tokenized once however often it is scored."""
        ids = self._cache.get(text)
        if ids is not None:
            self.hits += 1
            self._cache.move_to_end(text)
            return ids
        self.misses += 1
        ids = self._tok.encode(text, add_special_tokens=False).ids
        self._cache[text] = ids
        self._cached_tokens += len(ids)
        while self._cache and (
            len(self._cache) > self._cache_entries or self._cached_tokens > self._cache_tokens
        ):
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old)
        return ids


class PromptTokenizers:
    """Served model name → tokenizer, loaded on first use."""

    def __init__(self, dirs: dict[str, str | Path]) -> None:
        self._dirs = {m: Path(d) for m, d in dirs.items()}
        self._loaded: dict[str, PromptTokenizer] = {}

    def get(self, model: str) -> PromptTokenizer | None:
        if model not in self._dirs:
            return None
        if model not in self._loaded:
            self._loaded[model] = PromptTokenizer.from_dir(self._dirs[model])
        return self._loaded[model]
