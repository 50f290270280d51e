"""A request's prompt as token ids: plain text, token ids checked against the vocabulary, or
chat messages rendered through the model's template, each refused with the API's 400s."""

from __future__ import annotations

from infergw.simulator.protocol import ApiError, TemplateOptions
from infergw.simulator.request_builder import context_too_long
from infergw.simulator.tokenization import ChatTemplateError, ModelTokenizer

# Encoding costs about 500 bytes of memory per token, and a token is at most one byte of
# UTF-8: 1 MiB of text is at most ~500 MiB while it is encoded. vLLM has no such cap (its
# /tokenize takes any length); the simulator refuses more, so a pod's memory stays bounded.
MAX_ENCODE_BYTES = 1 << 20
# Each prompt of a list is a request of its own in the engine; vLLM sets no number, the
# simulator does, so a body of tiny prompts cannot make millions of them.
MAX_PROMPTS = 1024


class PromptEncoder:
    def __init__(
        self, tokenizer: ModelTokenizer, *, trust_request_chat_template: bool, max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.trust_request_chat_template = trust_request_chat_template
        self.max_model_len = max_model_len

    def encode_all(
        self, prompts: list[str | list[int]], add_special_tokens: bool
    ) -> list[list[int]]:
        """A completion's prompts, in order (slow work: run it off the event loop)."""
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(
                400,
                f"'prompt' has {len(prompts)} prompts; the simulator takes at most "
                f"{MAX_PROMPTS} in one request",
                "prompt",
            )
        return [self.encode(p, add_special_tokens) for p in prompts]

    def encode(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_text(prompt, add_special_tokens, "prompt")
        if len(prompt) >= self.max_model_len:  # before checking millions of ids one by one
            raise context_too_long(self.max_model_len, str(len(prompt)), "prompt")
        return self.check_vocab(prompt, "prompt")

    def encode_text(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """A prompt to generate from: one sure not to fit is refused before encoding it."""
        at_least = self.tokenizer.tokens_at_least(text)
        if at_least >= self.max_model_len:
            raise context_too_long(self.max_model_len, f"at least {at_least}", param)
        return self.tokenize(text, add_special_tokens, param)

    def chat_prompt(
        self, messages: list[dict], options: TemplateOptions, add_special_tokens: bool
    ) -> tuple[str, list[int]]:
        """A chat to generate from, rendered and encoded (slow work: off the event loop)."""
        text = self.render_chat(messages, options)
        return text, self.encode_text(text, add_special_tokens, "messages")

    def encode_chat(
        self, messages: list[dict], options: TemplateOptions, add_special_tokens: bool
    ) -> list[int]:
        text = self.render_chat(messages, options)
        return self.tokenize(text, add_special_tokens, "messages")

    def tokenize(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Any text as token ids, whatever its length against the context, up to the cap."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_ENCODE_BYTES:
            raise ApiError(
                400,
                f"the text to tokenize is {size} bytes of UTF-8; the simulator encodes at most "
                f"{MAX_ENCODE_BYTES} bytes in one text",
                param,
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_vocab(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of vocabulary (size {vocab})", param)
        return list(ids)

    def render_chat(self, messages: list[dict], options: TemplateOptions) -> str:
        # A template is code, rendered here on the event loop: vLLM runs one from a request
        # only when the operator trusts request templates.
        untrusted = (
            options.chat_template is not None
            or (options.chat_template_kwargs or {}).get("chat_template") is not None
        )
        if untrusted and not self.trust_request_chat_template:
            raise ApiError(
                400,
                "Chat template is passed with request, but --trust-request-chat-template is "
                "not set. Refused request with untrusted chat template.",
                "chat_template",
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                tools=options.tools,
                chat_template=options.chat_template,
                chat_template_kwargs=options.chat_template_kwargs,
            )
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), "messages") from exc
