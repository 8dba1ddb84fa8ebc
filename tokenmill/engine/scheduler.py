"""Continuous-batching scheduler (vLLM v1 style). Plain Python, no torch.

The EngineCore drives one step as::

    out = scheduler.schedule()                         # who computes which tokens, which blocks
    runner_out = model_runner.execute_model(out)       # tensors
    outputs = scheduler.update_from_output(out, runner_out)   # advance, append, stop, free

There are no separate prefill and decode phases: every request is "compute tokens
``[num_computed_tokens, num_tokens)``", so a decode is a 1-token chunk and a long prompt is split
into chunks that share the step's token budget with the decodes of other requests. Running
requests go first (in ``Request.sort_key`` order); when the KV cache runs out, the running
request with the worst sort key is preempted (its blocks freed, recomputed later). Waiting
requests are admitted afterwards, in sort-key order, while budget, seats and blocks last.

``schedule`` and ``update_from_output`` must alternate: one step in flight at a time.
"""

from __future__ import annotations

import bisect
import time

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.interfaces import (EngineCoreOutput, ModelRunnerOutput, ScheduledSeq,
                                         SchedulerOutput, SchedulerStats, TokenLogprobs)
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import FINISH_REASONS, Request, RequestStatus


def _at(values: list | None, i: int):
    # The runner may leave an optional per-seq list empty when nobody asked for it.
    return values[i] if values and i < len(values) else None


class Scheduler:
    """Owns the waiting and running queues and the KVCacheManager. Called by the EngineCore."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int):
        if num_blocks * cache_config.block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {cache_config.block_size} tokens = "
                f"{num_blocks * cache_config.block_size} tokens, fewer than max_model_len "
                f"({max_model_len}): a request of that length could never run")
        self.config = scheduler_config
        self.max_model_len = max_model_len
        # None means "not resolved yet" (EngineCore resolves it); same default as there.
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens or (
            2048 if scheduler_config.enable_chunked_prefill else max(2048, max_model_len))
        self.kv_cache_manager = KVCacheManager(num_blocks, cache_config.block_size,
                                               cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}   # every unfinished request
        self.waiting: list[Request] = []         # sorted by sort_key
        self.running: list[Request] = []         # sorted by sort_key
        # Ids that finished since the last schedule(); sent to the runner with the next step.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        self._num_batched_tokens = 0
        self._prompt_logprobs: dict[str, list[TokenLogprobs]] = {}  # accumulated per chunk

    # ------------------------------------------------------------------ front-end calls
    def add_request(self, request: Request) -> None:
        """Queue a new request (EngineCore, on an EngineCoreRequest)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        bisect.insort_right(self.waiting, request, key=Request.sort_key)

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """End requests from outside the step (abort, or a stop string found by the front end).

        Their blocks are freed at once; their ids go to the next SchedulerOutput's
        ``finished_req_ids``. Unknown or already finished ids are ignored.
        """
        assert status.finished, status
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        done = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
            queue.remove(request)
            request.status = status
            self._release(request)
            done.append(request)
        return done

    def abort_requests(self, request_ids) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished(self) -> int:
        return len(self.requests)

    def get_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage, prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self.num_preemptions,
            num_batched_tokens=self._num_batched_tokens)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first, then admit waiting ones."""
        out = SchedulerOutput(finished_req_ids=self.finished_req_ids)
        self.finished_req_ids = set()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        # NOTE: after a preemption the cache is full; admitting waiting requests now would
        # only thrash (vLLM skips them too).
        if not out.preempted_req_ids:
            budget = self._schedule_waiting(out, budget)
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        self._num_batched_tokens = out.num_batched_tokens
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        kv = self.kv_cache_manager
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while kv.allocate_slots(request, num_new) is None:
                # NOTE: running is sorted, so the victim is behind request (not yet scheduled
                # this step) unless it is request itself.
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_req_ids.add(victim.request_id)
                if victim is request:
                    return budget
            out.scheduled.append(self._seq(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        kv, cfg = self.kv_cache_manager, self.config
        admitted = 0
        for request in self.waiting:
            if budget <= 0 or len(self.running) >= cfg.max_num_seqs:
                break
            hits, num_hit_tokens = kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if cfg.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                break
            if kv.allocate_slots(request, num_new, hits) is None:
                break  # waiting requests never preempt running ones
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:  # first admission only; kept across preemptions
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            bisect.insort_right(self.running, request, key=Request.sort_key)
            out.scheduled.append(self._seq(request, num_new))
            budget -= num_new
            admitted += 1
        # NOTE: admission always stops at the first request that does not fit, so the
        # admitted ones are a prefix of the sorted queue.
        del self.waiting[:admitted]
        return budget

    def _seq(self, request: Request, num_tokens: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(request=request, start_pos=start, num_tokens=num_tokens,
                            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
                            sample=start + num_tokens == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and queue it to recompute prompt + outputs so far."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        if request.num_output_tokens == 0:
            # Its prompt logprobs are not sent yet and will be recomputed from position 0.
            self._prompt_logprobs.pop(request.request_id, None)
        # Ahead of any waiting request with an equal sort key.
        pos = bisect.bisect_left(self.waiting, request.sort_key(), key=Request.sort_key)
        self.waiting.insert(pos, request)

    def _release(self, request: Request) -> None:
        """A finished request leaves: blocks freed, id reported to the runner next step."""
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._prompt_logprobs.pop(request.request_id, None)
        self.finished_req_ids.add(request.request_id)

    # ------------------------------------------------------------------ update
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance each scheduled request by the step's result (EngineCore, after the runner).

        Returns one EngineCoreOutput per request that got a token or finished in this step.
        """
        outputs = []
        for i, seq in enumerate(scheduler_output.scheduled):
            request = seq.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted between schedule() and now: its blocks are already gone
            request.num_computed_tokens += seq.num_tokens
            chunk_logprobs = _at(runner_output.prompt_logprobs, i)
            if chunk_logprobs and request.num_output_tokens == 0:
                self._prompt_logprobs.setdefault(request.request_id, []).extend(chunk_logprobs)
            token = _at(runner_output.sampled_token_ids, i)
            if token is not None:
                outputs.append(self._append_token(request, token, _at(runner_output.logprobs, i)))
        return outputs

    def _append_token(self, request: Request, token: int,
                      logprobs: TokenLogprobs | None) -> EngineCoreOutput:
        request.append_output_token(token)
        out = EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[token],
            new_logprobs=[logprobs] if logprobs is not None else None,
            num_cached_tokens=max(request.num_cached_tokens, 0))
        if request.num_output_tokens == 1:
            out.queue_time = max(0.0, (request.first_scheduled_time or request.arrival_time)
                                 - request.arrival_time)
            if request.params.prompt_logprobs is not None:
                out.prompt_logprobs = self._prompt_logprobs.pop(request.request_id, [])
        status = self._check_stop(request, token)
        if status is not None:
            request.status = status
            self.running.remove(request)
            self._release(request)
            out.finish_reason = FINISH_REASONS[status]
            out.stop_reason = request.stop_reason
        return out

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        """Stop checks on the token just appended, in order: eos, stop token, length."""
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None
