"""Errors the picker answers with, as the endpoint-picker protocol wants them."""

from __future__ import annotations


class PickerError(Exception):
    """A request the picker cannot route: becomes an ImmediateResponse with this status.

    The body is OpenAI-style JSON so clients' SDKs show the message.
    """

    KINDS = {
        400: "BadRequest",
        404: "NotFound",
        413: "RequestEntityTooLarge",
        422: "UnprocessableEntity",
        429: "TooManyRequests",
        500: "Internal",
        503: "ServiceUnavailable",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or self.KINDS.get(status, "Error")
        self.headers = headers or {}  # e.g. Retry-After on a 429
        self.param = param  # the request field at fault, when one is

    def body(self) -> dict:
        return {
            "error": {
                "message": f"inference error: {self.code} - {self.message}",
                "type": self.code,
                "param": self.param,
                "code": self.status,
            }
        }
