"""AsyncLLM with the engine core in its own process (ZMQ): streaming, abort, core death."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tokenmill import SamplingParams
from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.sampling_params import RequestOutputKind


def make_engine(path: str, in_process: bool = False) -> AsyncLLM:
    cfg = EngineConfig(model=ModelConfig(model=path, dtype="float32"),
                       cache=CacheConfig(block_size=4))
    return AsyncLLM(cfg, in_process=in_process)


async def collect(engine, prompt, params, rid):
    return [o async for o in engine.generate(prompt, params, rid)]


@pytest.mark.parametrize("in_process", [False, True])
def test_stream_deltas_concatenate_to_final(tiny_llama, in_process):
    engine = make_engine(tiny_llama, in_process)
    try:
        async def main():
            delta = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                   output_kind=RequestOutputKind.DELTA)
            final = delta.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            a, b = await asyncio.gather(collect(engine, "Hello café", delta, "a"),
                                        collect(engine, "Hello café", final, "b"))
            return a, b
        deltas, finals = asyncio.run(main())
        assert len(finals) == 1 and finals[0].finished
        text = "".join(o.outputs[0].text for o in deltas)
        ids = [t for o in deltas for t in o.outputs[0].token_ids]
        assert text == finals[0].outputs[0].text
        assert ids == finals[0].outputs[0].token_ids and len(ids) == 16
        assert deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    finally:
        engine.shutdown()


def test_abort_frees_blocks_and_dead_core_fails_fast(tiny_llama):
    engine = make_engine(tiny_llama)
    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            gen = engine.generate("x " * 20, params, "long")
            await gen.__anext__()
            await gen.aclose()  # the client went away: abort
            for _ in range(100):
                await asyncio.sleep(0.02)
                if engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0:
                    break
            assert engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0

            # A request in flight when the core dies gets an error at once, not a hang.
            gen = engine.generate("y " * 20, params, "doomed")
            await gen.__anext__()
            os.kill(engine.client.proc.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(gen.__anext__(), timeout=10)
                async for _ in gen:
                    pass
            assert not engine.is_alive
            with pytest.raises(EngineDeadError):
                await collect(engine, "z", params, "after")
        asyncio.run(main())
    finally:
        engine.shutdown()
