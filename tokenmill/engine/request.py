"""Request: the engine core's record of one sequence. Plain Python, no torch."""

from __future__ import annotations

import enum
import time

from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence inside the engine core.

    ``num_computed_tokens`` counts the tokens whose KV is in the cache (prefix hits included).
    After a preemption it returns to 0 and the request recomputes prompt + output so far.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int] | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        max_tokens: int | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = list(eos_token_ids or [])
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Resolved by the engine (params.max_tokens or what the context leaves).
        self.max_tokens = max_tokens if max_tokens is not None else (params.max_tokens or 2**31)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1   # prefix-cache hit tokens at first schedule; -1 until then
        self.num_preemptions = 0
        self.stop_reason: int | None = None
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled lazily
        self.first_scheduled_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.priority, self.arrival_time)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
