"""Prompt → token ids exactly as vLLM computes them, for looking prompts up in the index.

Written apart from simulator/tokenization.py on purpose: the simulator stands alone like a real
engine, so a tokenization bug on either side shows up as index misses instead of hiding
behind shared code. Completions encode with special tokens; chats render the model's chat
template the way Hugging Face transformers does and encode without them (the template carries
the BOS), which is what vLLM does.
"""

from __future__ import annotations

import json
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Encoding, Tokenizer

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class PromptError(ValueError):
    """The body cannot be turned into tokens (bad prompt, bad messages, template error).

    `str(exc)` is for the client (it may quote a library's message, which may quote the
    prompt); `reason` is ours alone, what log lines say."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _raise(message: str) -> None:
    raise PromptError("chat template raised", message)


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


def encode_unlocked(tok: Tokenizer, text: str, *, special: bool) -> Encoding:
    """`tok.encode(text)` with the GIL released while it runs: encode() holds it throughout
    (a 4 MiB prompt froze the picker's event loop, scrapes and all, for 16 s on the thread
    meant to keep it free); encode_batch() releases it."""
    return tok.encode_batch([text], add_special_tokens=special)[0]


def ids_unlocked(tok: Tokenizer, text: str, *, special: bool) -> list[int]:
    """The token ids of `text`, the GIL released as in encode_unlocked, without the offsets
    an Encoding otherwise carries: encode_batch_fast skips working them out, ~40 % of the
    CPU of a ~100-token prompt (120 against 200 µs), and the prompt path needs only ids."""
    return tok.encode_batch_fast([text], add_special_tokens=special)[0].ids


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
        self._cache = _PrefixCache(self._tok, cache_entries, cache_tokens)
        # What add_special_tokens wraps around a single sequence (a BOS, say), found once.
        plain = self._tok.encode("a", add_special_tokens=False).ids
        wrapped = self._tok.encode("a", add_special_tokens=True).ids
        at = _find(wrapped, plain)
        self._wrap = (wrapped[:at], wrapped[at + len(plain) :]) if at >= 0 else None

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

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
            raise PromptError("chat template failed", str(exc)) from exc

    def _encode(self, text: str, *, special: bool) -> list[int]:
        try:
            if special and self._wrap is None:
                return ids_unlocked(self._tok, text, special=True)
            ids = self._cache.encode(text)
        except TypeError as exc:  # lone surrogates and the like
            raise PromptError("prompt text cannot be tokenized", str(exc)) from exc
        if special:
            head, tail = self._wrap
            return [*head, *ids, *tail]
        return ids


def _shared_prefix(a: str, b: str) -> int:
    """Length of the common prefix, by binary search over C-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


class _PrefixCache:
    """Token ids of recent prompts, reused for the part a new prompt shares with one.

    A new text that shares a long prefix with a cached one keeps the cached ids up to the
    last pre-token boundary inside the shared part and encodes only the rest. BPE works per
    pre-token and the pre-tokenizer looks at most one character ahead, so a cut at a pre-token
    boundary inside the shared text gives the ids a full encode gives. The first few reuses
    are checked against a full encode anyway; one mismatch turns reuse off for the tokenizer.
    """

    MIN_SHARED = 256  # characters: below this a full encode is cheap enough
    VERIFY_FIRST = 8

    def __init__(self, tok: Tokenizer, max_entries: int, max_tokens: int) -> None:
        self._tok = tok
        # text → (ids, token starts, pre-token starts); both starts None until first reused
        self._entries: OrderedDict[str, tuple[list[int], list[int] | None, list[int] | None]] = (
            OrderedDict()
        )
        self._by_head: dict[str, list[str]] = {}
        self._max_entries, self._max_tokens, self._tokens = max_entries, max_tokens, 0
        self._verified = 0
        added = tok.get_added_tokens_decoder().values()
        self._margin = max((len(t.content) for t in added), default=0) + 1
        self.reuse_ok = True
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        # The event loop and worker threads (e.g. /debug/prefix-scores) share the cache. A
        # busy cache is skipped, not waited for: the loop must never wait on a long encode,
        # and a plain encode gives the same ids.
        if not self._lock.acquire(blocking=False):
            self.misses += 1
            return ids_unlocked(self._tok, text, special=False)
        try:
            return self._encode(text)
        finally:
            self._lock.release()

    def _encode(self, text: str) -> list[int]:
        cached = self._entries.get(text)
        if cached is not None:
            self._entries.move_to_end(text)
            self.hits += 1
            return cached[0]
        reused = self._reuse(text) if self.reuse_ok else None
        if reused is None:
            self.misses += 1
            # Offsets and pre-token starts are worked out only if the entry is ever reused:
            # a miss then costs no more than a plain encode. The Encoding is not kept for
            # them: it holds ~400 bytes a token (a cache of 2M tokens of them held ~800 MB).
            ids = ids_unlocked(self._tok, text, special=False)
            starts, boundaries = None, None
        else:
            ids, starts, boundaries = reused
        if len(text) >= self.MIN_SHARED:
            self._remember(text, ids, starts, boundaries)
        return ids

    def _boundaries(self, text: str, shift: int) -> list[int]:
        pre = self._tok.pre_tokenizer
        if pre is None:
            return [shift]
        return [shift + span[0] for _, span in pre.pre_tokenize_str(text)]

    def _reuse(self, text: str):
        """(ids, token starts, pre-token starts) built on a cached text, or None."""
        best, shared = None, 0
        for other in self._by_head.get(text[: self.MIN_SHARED], ()):
            n = _shared_prefix(other, text)
            if n > shared:
                best, shared = other, n
        if best is None or shared < self.MIN_SHARED:
            return None
        ids, starts, boundaries = self._entries[best]
        if boundaries is None:  # first reuse of this entry: finish it now
            starts = [a for a, _ in encode_unlocked(self._tok, best, special=False).offsets]
            boundaries = self._boundaries(best, 0)
            self._entries[best] = (ids, starts, boundaries)
        # Cut at a pre-token start that is also a token start, far enough before the end of
        # the shared text that no added (special) token can straddle it.
        at = bisect_right(boundaries, shared - 1 - self._margin) - 1
        while at >= 0:
            keep = bisect_left(starts, boundaries[at])
            if keep < len(starts) and starts[keep] == boundaries[at]:
                break
            at -= 1
        cut = boundaries[at] if at >= 0 else 0
        if cut <= 0:
            return None
        tail = encode_unlocked(self._tok, text[cut:], special=False)
        out = ids[:keep] + tail.ids
        if self._verified < self.VERIFY_FIRST:
            self._verified += 1
            if ids_unlocked(self._tok, text, special=False) != out:
                self.reuse_ok = False  # this tokenizer does not cut cleanly: always encode
                return None
        self.hits += 1
        return (
            out,
            starts[:keep] + [cut + a for a, _ in tail.offsets],
            boundaries[:at] + self._boundaries(text[cut:], cut),
        )

    def _remember(
        self, text: str, ids: list[int], starts: list[int] | None, boundaries: list[int] | None
    ) -> None:
        self._entries[text] = (ids, starts, boundaries)
        self._by_head.setdefault(text[: self.MIN_SHARED], []).append(text)
        self._tokens += len(ids)
        while self._entries and (
            len(self._entries) > self._max_entries or self._tokens > self._max_tokens
        ):
            old, (old_ids, _, _) = self._entries.popitem(last=False)
            self._tokens -= len(old_ids)
            bucket = self._by_head.get(old[: self.MIN_SHARED], [])
            bucket.remove(old)
            if not bucket:
                self._by_head.pop(old[: self.MIN_SHARED], None)


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
