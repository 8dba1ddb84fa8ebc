"""EngineCore: the loop that owns the scheduler and the model runner.

It runs in its own process behind ``core_client.ProcessCoreClient`` (the server) or in-process
(the offline ``LLM`` and tests). Requests arrive as ``EngineCoreRequest`` with token ids already
made; outputs leave as ``EngineCoreOutputs`` with token ids only: text is the front end's job.
"""

from __future__ import annotations

import logging
import time

from tokenmill.config import EngineConfig
from tokenmill.engine.interfaces import EngineCoreOutputs, EngineCoreRequest
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


def resolve_max_model_len(config: EngineConfig) -> int:
    """Fill ``config.model.max_model_len`` from the checkpoint (a cheap config.json read)."""
    from tokenmill.models.loader import load_hf_config

    hf = load_hf_config(config.model.model)
    limit = getattr(hf, "max_position_embeddings", None) or 2048
    want = config.model.max_model_len
    if want is None:
        want = limit
    elif want > limit:
        raise ValueError(f"max_model_len ({want}) is larger than the model's "
                         f"max_position_embeddings ({limit})")
    config.model.max_model_len = want
    sch = config.scheduler
    if sch.max_num_batched_tokens is None:
        sch.max_num_batched_tokens = 2048 if sch.enable_chunked_prefill else max(2048, want)
    config.__post_init__()  # re-check the cross-field rules now that the length is known
    return want


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = True):
        from tokenmill.worker.model_runner import ModelRunner  # torch lives below this line

        resolve_max_model_len(config)
        self.config = config
        self.max_model_len = config.model.max_model_len
        self.runner = ModelRunner(config, progress=progress)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks,
                                   self.max_model_len)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", self.runner.num_blocks,
                    config.cache.block_size, self.runner.num_blocks * config.cache.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_blocks

    def add_request(self, req: EngineCoreRequest) -> None:
        room = self.max_model_len - len(req.prompt_token_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(req.prompt_token_ids)} tokens leaves no room in "
                             f"max_model_len={self.max_model_len}")
        max_tokens = min(req.params.max_tokens or room, room)
        self.scheduler.add_request(Request(
            req.request_id, req.prompt_token_ids, req.params, req.eos_token_ids,
            priority=req.priority, arrival_time=req.arrival_time or None, max_tokens=max_tokens))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """One engine iteration: schedule -> execute -> update."""
        sched_out = self.scheduler.schedule()
        outputs = []
        if not sched_out.is_empty:
            runner_out = self.runner.execute(sched_out)
            outputs = self.scheduler.update_from_output(sched_out, runner_out)
        if self.config.check_invariants:
            self.scheduler.kv_cache_manager.check_invariants()
        return EngineCoreOutputs(outputs=outputs, stats=self.scheduler.get_stats(),
                                 timestamp=time.monotonic())

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv_cache_manager.reset_prefix_cache()


__all__ = ["EngineCore", "RequestStatus", "resolve_max_model_len"]
