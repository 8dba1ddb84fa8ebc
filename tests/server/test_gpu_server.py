"""The real server on an NVIDIA GPU (skipped without one): the engine core process holds the
weights and the KV cache on the GPU, and greedy answers equal the offline engine's there."""

from __future__ import annotations

import openai
import pytest
from _server import start_server

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

PROMPTS = ["The quick brown fox", "Paris is the capital of", "1 2 3 4"]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with start_server(tiny_llama, "--device", "cuda", "--served-model-name", "tiny") as srv:
        yield srv


def test_greedy_completions_equal_the_offline_engine_on_the_gpu(server, tiny_llama):
    from tokenmill import LLM, SamplingParams

    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60) as c:
        whole = [c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
                 for p in PROMPTS]
        streamed = []
        for p in PROMPTS:
            chunks = c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                          stream=True)
            streamed.append("".join(ch.choices[0].text for ch in chunks if ch.choices))
    llm = LLM(model=tiny_llama, dtype="float32", device="cuda", show_progress=False)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    want = [o.outputs[0].text for o in offline]
    assert [r.choices[0].text for r in whole] == want
    assert streamed == want
    assert all(r.usage.completion_tokens == len(o.outputs[0].token_ids)
               for r, o in zip(whole, offline))
    assert "model on cuda" in server.log()
