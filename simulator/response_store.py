"""Stored Responses API answers, as vLLM keeps them: in the server's memory, by id, so
`previous_response_id` continues a conversation and `GET /v1/responses/{id}` reads one back —
on this server only (the gateway routes them here: epp/stored_responses.py). Bounded: past
`capacity` the oldest are forgotten (vLLM's store has no bound)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from infergw.simulator.protocol import ApiError

DEFAULT_CAPACITY = 10_000


@dataclass(frozen=True, slots=True)
class Stored:
    answer: dict  # the response object as it was sent
    messages: tuple[dict, ...]  # the conversation up to and including its answer


def not_found(response_id: str) -> ApiError:
    """vLLM's answer for an id it does not hold."""
    return ApiError(404, f"Response with id '{response_id}' not found.")


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, answer: dict, messages: list[dict]) -> None:
        self._items[answer["id"]] = Stored(answer, tuple(messages))
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored:
        stored = self._items.get(response_id)
        if stored is None:
            raise not_found(response_id)
        return stored

    def __len__(self) -> int:
        return len(self._items)
