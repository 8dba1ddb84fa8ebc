"""The offline API as a vLLM user drives it: generate / chat, sampling features, outputs."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama, dtype="float32", block_size=4, show_progress=False)


def test_outputs_in_input_order_with_shapes(llm):
    prompts = ["Hello world", "The quick brown fox", {"prompt_token_ids": [5, 6, 7, 8]}]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello world", "The quick brown fox", None]
    assert outs[2].prompt_token_ids == [5, 6, 7, 8]
    tok = llm.get_tokenizer()
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 5
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_per_prompt_params_and_max_tokens(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                     SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 7]
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_n_greater_than_one_and_seed_reproducible(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    a = llm.generate("Once upon a time", p, use_tqdm=False)[0]
    b = llm.generate("Once upon a time", p, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # children seeded differently


def test_seeded_sampling_same_alone_and_in_busy_batch(llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=20, ignore_eos=True)
    alone = llm.generate("The café on the corner", p, use_tqdm=False)[0].outputs[0].token_ids
    noisy = [SamplingParams(temperature=1.2, max_tokens=25, ignore_eos=True)] * 6
    prompts = ["x y z", "The café on the corner", "Numbers 1 2 3", "hello", "foo bar",
               "Lorem ipsum dolor", "Tokens and blocks"]
    params = noisy[:1] + [p] + noisy[1:]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone


def test_logprobs_and_prompt_logprobs(llm):
    p = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                       ignore_eos=True)
    out = llm.generate("The quick brown fox", p, use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    total = 0.0
    for tok, pos in zip(c.token_ids, c.logprobs):
        assert tok in pos and pos[tok].rank == 1  # greedy picks the most likely token
        assert 3 <= len(pos) <= 4
        assert all(lp.logprob <= 0 for lp in pos.values())
        total += pos[tok].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tok, pos in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tok in pos


def test_stop_strings_and_stop_token_ids(llm):
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("Hello there", base, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 4
    stop = text[2:4]
    cut = llm.generate("Hello there", base.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    kept = llm.generate("Hello there", base.clone(stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]
    tid = full.token_ids[3]
    by_id = llm.generate("Hello there", base.clone(stop_token_ids=[tid]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tid
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(tid) + 1]


def test_chat_applies_template(llm):
    tok = llm.get_tokenizer()
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                   use_tqdm=False)[0]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == want
    assert out.prompt_token_ids == tok.encode(want, add_special_tokens=False)
    two = llm.chat([msgs, msgs[1:]], SamplingParams(temperature=0, max_tokens=2),
                   use_tqdm=False)
    assert len(two) == 2


def test_bad_input_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": [5] * 10_000}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert not llm.engine.has_unfinished_requests()


def test_priority_and_progress_bar(llm, capsys):
    outs = llm.generate(["a", "b", "c"], SamplingParams(temperature=0, max_tokens=2),
                        priority=[2, 0, 1], use_tqdm=True)
    assert len(outs) == 3
    assert "Generating" in capsys.readouterr().err


def test_max_tokens_none_fills_the_context(tiny_llama):
    small = LLM(model=tiny_llama, dtype="float32", max_model_len=40, show_progress=False)
    out = small.generate({"prompt_token_ids": [5] * 30},
                         SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LLM(model=str(tmp_path / "nope"), show_progress=False)
