"""Sampler: exact effect of each stage, seeded reproducibility, distribution, logprobs."""

import math

import pytest
import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.sampler import (Sampler, SamplingRow, apply_logits_processors,
                                      compute_prompt_logprobs)

EOS = 0


def row(prompt=(), output=(), generator=None, eos=(EOS,), **params) -> SamplingRow:
    return SamplingRow(params=SamplingParams(**params), prompt_token_ids=list(prompt),
                       output_token_ids=list(output), eos_token_ids=list(eos),
                       generator=generator)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def sampler():
    return Sampler("cpu", seed=0)


def random_logits(b, v, seed=0):
    return torch.randn(b, v, generator=gen(seed)) * 3


# ---------------------------------------------------------------------- greedy and filters
def test_greedy_is_argmax_and_leaves_logits_untouched(sampler):
    logits = random_logits(8, 50)
    before = logits.clone()
    tokens, logprobs = sampler.sample(logits, [row(temperature=0.0) for _ in range(8)])
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 8
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy(sampler, temperature):
    logits = random_logits(16, 100, seed=1)
    for _ in range(5):
        tokens, _ = sampler.sample(logits, [row(temperature=temperature, top_k=1)] * 16)
        assert tokens == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy(sampler):
    logits = random_logits(16, 100, seed=2)
    for _ in range(5):
        tokens, _ = sampler.sample(logits, [row(temperature=2.0, top_p=1e-6)] * 16)
        assert tokens == logits.argmax(-1).tolist()


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _draws(sampler, n=4000, **params):
    logits = PROBS.log().expand(n, 4).contiguous()
    tokens, _ = sampler.sample(logits, [row(**params)] * n)
    return torch.bincount(torch.tensor(tokens), minlength=4)


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.7), {0, 1}),        # 0.5 + 0.3 is the smallest set reaching 0.7
    (dict(top_p=0.85), {0, 1, 2}),
    (dict(min_p=0.5), {0, 1}),        # p >= 0.5 * 0.5
    (dict(min_p=0.2), {0, 1, 2}),     # p >= 0.2 * 0.5
    (dict(top_k=3, top_p=0.7), {0, 1}),
])
def test_filters_keep_exactly_the_allowed_tokens(sampler, params, allowed):
    counts = _draws(sampler, **params)
    assert {t for t in range(4) if counts[t] > 0} == allowed
    # The survivors keep their relative probabilities.
    kept = PROBS[sorted(allowed)] / PROBS[sorted(allowed)].sum()
    freq = counts[sorted(allowed)].float() / counts.sum()
    assert torch.allclose(freq, kept, atol=0.04)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distribution_matches_softmax(temperature):
    sampler = Sampler("cpu", seed=123)
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    n = 10_000
    tokens, _ = sampler.sample(logits.expand(n, 4).contiguous(),
                               [row(temperature=temperature)] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / n
    # 4 standard deviations of a frequency over 10k draws is at most 0.02.
    assert torch.allclose(freq, torch.softmax(logits / temperature, -1), atol=0.02)


# ---------------------------------------------------------------------- logits processors
BASE = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])


def test_repetition_penalty_over_prompt_and_output():
    out = apply_logits_processors(BASE, [row(prompt=[0], output=[1, 1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, 1.0]]


def test_frequency_penalty_counts_output_only():
    out = apply_logits_processors(BASE, [row(prompt=[3], output=[1, 1, 2],
                                             frequency_penalty=0.5)])
    assert out.tolist() == [[2.0, -2.0, 0.0, 3.0, 1.0]]


def test_presence_penalty_counts_output_only():
    out = apply_logits_processors(BASE, [row(prompt=[3], output=[1, 1, 2],
                                             presence_penalty=0.5)])
    assert out.tolist() == [[2.0, -1.5, 0.0, 3.0, 1.0]]


def test_penalties_combined_only_on_their_rows():
    logits = BASE.expand(3, 5).contiguous()
    rows = [row(output=[3, 3]),  # no penalty
            row(prompt=[0], output=[3, 3, 1], repetition_penalty=2.0,
                frequency_penalty=0.25, presence_penalty=1.0),
            row(output=[4], logit_bias={2: 1.5})]
    out = apply_logits_processors(logits, rows)
    assert out[0].tolist() == BASE[0].tolist()
    # rep: 0 -> 1.0, 3 -> 1.5, 1 -> -2.0; then freq: 3 -= 0.5, 1 -= 0.25; presence: -1 each
    assert out[1].tolist() == [1.0, -3.25, 0.5, 0.0, 1.0]
    assert out[2].tolist() == [2.0, -1.0, 2.0, 3.0, 1.0]
    assert torch.equal(logits, BASE.expand(3, 5))  # input untouched


def test_no_processing_returns_the_same_tensor():
    assert apply_logits_processors(BASE, [row(min_tokens=0, output=[1])]) is BASE


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_forces_a_token(sampler, temperature):
    logits = random_logits(4, 30, seed=3)
    for _ in range(3):
        tokens, _ = sampler.sample(logits, [row(temperature=temperature,
                                                logit_bias={7: 100.0})] * 4)
        assert tokens == [7] * 4


def test_logit_bias_can_ban_a_token(sampler):
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    tokens, _ = sampler.sample(logits, [row(temperature=0.0, logit_bias={1: -100.0})])
    assert tokens == [0]


def test_min_tokens_blocks_eos_and_stop_tokens(sampler):
    logits = torch.tensor([[10.0, 1.0, 2.0, 9.0]])  # EOS=0 best, then stop token 3
    blocked = dict(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    assert sampler.sample(logits, [row(output=[1, 1], **blocked)])[0] == [2]
    assert sampler.sample(logits, [row(output=[1, 1, 1], **blocked)])[0] == [0]
    # With ignore_eos, EOS is an ordinary token that min_tokens does not block.
    assert sampler.sample(logits, [row(ignore_eos=True, **blocked)])[0] == [0]
    for _ in range(20):  # random sampling never picks them either
        assert sampler.sample(logits, [row(min_tokens=3, stop_token_ids=[3])])[0] != [0]


def test_mixed_batch_greedy_rows_take_processed_argmax(sampler):
    logits = random_logits(6, 40, seed=4)
    rows = [row(temperature=0.0), row(temperature=1.0), row(temperature=0.0, logit_bias={5: 50}),
            row(temperature=0.8, top_k=5), row(temperature=0.0), row(temperature=1.2, top_p=0.5)]
    tokens, _ = sampler.sample(logits, rows)
    assert tokens[0] == logits[0].argmax() and tokens[4] == logits[4].argmax()
    assert tokens[2] == 5
    assert tokens[3] in logits[3].topk(5).indices.tolist()


# ---------------------------------------------------------------------- seeds
def _seeded_run(seed, logits_row, batch: bool, steps=20, **params):
    sampler = Sampler("cpu", seed=999 if batch else 0)
    g = gen(seed)
    out = []
    for step in range(steps):
        if not batch:
            tokens, _ = sampler.sample(logits_row[None], [row(generator=g, **params)])
            out.append(tokens[0])
            continue
        others = random_logits(4, logits_row.numel(), seed=100 + step)
        logits = torch.cat([others[:2], logits_row[None], others[2:]])
        rows = [row(temperature=0.7), row(generator=gen(step), top_k=3),
                row(generator=g, **params), row(temperature=0.0), row(top_p=0.5)]
        out.append(sampler.sample(logits, rows)[0][2])
    return out


@pytest.mark.parametrize("params", [{}, dict(temperature=0.8, top_p=0.9, top_k=20)])
def test_seeded_row_is_independent_of_the_batch(params):
    logits_row = random_logits(1, 64, seed=5)[0] / 3
    alone = _seeded_run(42, logits_row, batch=False, **params)
    assert alone == _seeded_run(42, logits_row, batch=True, **params)
    assert alone == _seeded_run(42, logits_row, batch=False, **params)  # a second sampler
    assert len(set(alone)) > 3  # really random
    assert alone != _seeded_run(43, logits_row, batch=False, **params)


def test_unseeded_rows_follow_the_sampler_seed():
    logits = random_logits(8, 64, seed=6) / 3
    runs = []
    for seed in (7, 7, 8):
        sampler = Sampler("cpu", seed=seed)
        runs.append([sampler.sample(logits, [row()] * 8)[0] for _ in range(3)])
    assert runs[0] == runs[1] != runs[2]


# ---------------------------------------------------------------------- logprobs
def test_logprobs_chosen_first_then_top_k_with_rank(sampler):
    logits = random_logits(3, 20, seed=7)
    raw = torch.log_softmax(logits, -1)
    forced = raw[1].argsort()[5].item()  # the 15th most likely token of row 1
    rows = [row(temperature=0.0, logprobs=3),
            row(temperature=1.0, logit_bias={forced: 100.0}, logprobs=4),
            row(temperature=0.0)]
    tokens, lps = sampler.sample(logits, rows)
    assert lps[2] is None
    assert tokens[1] == forced
    for i, k in ((0, 3), (1, 4)):
        entry = lps[i]
        top = raw[i].topk(k)
        assert entry.token_ids == [tokens[i]] + top.indices.tolist()
        # Raw logprobs: before bias / temperature.
        assert entry.logprobs == pytest.approx([raw[i, tokens[i]].item()] + top.values.tolist())
        assert entry.logprobs[1:] == sorted(entry.logprobs[1:], reverse=True)
    assert lps[0].rank == 1
    assert lps[1].rank == 15 == 1 + int((raw[1] > raw[1, forced]).sum())


def test_logprobs_zero_gives_only_the_chosen_token(sampler):
    logits = random_logits(1, 10, seed=8)
    tokens, lps = sampler.sample(logits, [row(temperature=0.0, logprobs=0)])
    assert lps[0].token_ids == tokens
    assert lps[0].logprobs == [pytest.approx(torch.log_softmax(logits, -1)[0].max().item())]
    assert lps[0].rank == 1


def test_prompt_logprobs():
    logits = random_logits(3, 12, seed=9)
    raw = torch.log_softmax(logits, -1)
    targets = [4, raw[1].argmax().item(), raw[2].argmin().item()]
    entries = compute_prompt_logprobs(logits, targets, k=2)
    assert len(entries) == 3
    for i, e in enumerate(entries):
        top = raw[i].topk(2)
        assert e.token_ids == [targets[i]] + top.indices.tolist()
        assert e.logprobs == pytest.approx([raw[i, targets[i]].item()] + top.values.tolist())
        assert e.rank == 1 + int((raw[i] > raw[i, targets[i]]).sum())
    assert entries[1].rank == 1 and entries[2].rank == 12
    assert all(math.isfinite(x) for e in entries for x in e.logprobs)
    assert compute_prompt_logprobs(logits[:0], [], k=2) == []
