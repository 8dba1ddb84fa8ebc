"""Typed contracts between the engine's layers.

    front end (tokenizer)  --EngineCoreRequest-->   EngineCore  --EngineCoreOutputs-->  front end
    EngineCore: Scheduler  --SchedulerOutput-->     ModelRunner --ModelRunnerOutput-->  Scheduler

``EngineCoreRequest`` / ``EngineCoreOutputs`` cross a process boundary, so they are msgspec
Structs. ``SchedulerOutput`` / ``ModelRunnerOutput`` stay inside the core process and may hold
references to live ``Request`` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams


# --------------------------------------------------------------------------- front <-> core
class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = []
    priority: int = 0
    arrival_time: float = 0.0


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one position: the chosen token first, then the top-k in rank order."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int  # rank of the chosen token among all tokens (1 = most likely)


class EngineCoreOutput(msgspec.Struct, omit_defaults=True, array_like=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # Sent once, with the first generated token: logprobs of prompt positions 1..P-1.
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None    # the stop token id that ended the request, if any
    num_cached_tokens: int = 0
    # Seconds from arrival to first scheduling; sent with the first generated token.
    queue_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0        # fraction of blocks held by requests (cached-free counts free)
    prefix_cache_queries: int = 0      # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0         # cumulative prompt tokens found
    num_preemptions: int = 0           # cumulative
    num_batched_tokens: int = 0        # tokens computed in the last step


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


# --------------------------------------------------------------------------- scheduler <-> runner
@dataclass
class ScheduledSeq:
    """One request's work in a step: compute ``num_tokens`` tokens starting at ``start_pos``.

    The tokens are ``request.all_token_ids[start_pos:start_pos + num_tokens]``; their KV goes
    to the slots given by ``request``'s block table (``block_ids``). ``sample`` is True when the
    chunk reaches the end of the known tokens, so the step produces the next token.
    """

    request: Request
    start_pos: int
    num_tokens: int
    block_ids: list[int]
    sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Requests that finished or were aborted/preempted since the last step: the runner drops
    # its per-request state (seeded generators etc.) for the finished ones.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """Aligned index by index with ``SchedulerOutput.scheduled``."""

    sampled_token_ids: list[int | None]
    logprobs: list[TokenLogprobs | None]
    # Logprobs of the chunk's positions whose next token is a prompt token (only for requests
    # that asked for prompt_logprobs).
    prompt_logprobs: list[list[TokenLogprobs] | None]
