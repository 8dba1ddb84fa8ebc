"""Scheduler driven by a fake model runner: exact chunks, block ids, preemption, stops."""

import random

import pytest

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.interfaces import ModelRunnerOutput, TokenLogprobs
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams


class FakeRunner:
    """Deterministic stand-in for the ModelRunner.

    Samples ``token_fn(request)`` (default ``100 + num_output_tokens``, so a resumed request
    produces the same tokens). It also simulates the KV cache: every computed position writes
    the hash of the tokens up to it into its slot, then every seq checks that all slots it
    attends to hold exactly its own prefix, which catches wrong sharing or early eviction.
    """

    def __init__(self, block_size, token_fn=None):
        self.block_size = block_size
        self.token_fn = token_fn or (lambda r: 100 + r.num_output_tokens)
        self.kv: dict[int, int] = {}
        self.steps: list[list[tuple]] = []

    def _slot(self, seq, pos):
        return seq.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, out):
        self.steps.append([(s.request_id, s.start_pos, s.num_tokens, s.sample)
                           for s in out.scheduled])
        for s in out.scheduled:
            tokens = s.request.all_token_ids
            assert s.start_pos == s.request.num_computed_tokens
            assert len(s.block_ids) * self.block_size >= s.start_pos + s.num_tokens
            for p in range(s.start_pos, s.start_pos + s.num_tokens):
                self.kv[self._slot(s, p)] = hash(tuple(tokens[:p + 1]))
        # NOTE: all writes before any read, as in the paged attention kernel.
        for s in out.scheduled:
            tokens = s.request.all_token_ids
            for p in range(s.start_pos + s.num_tokens):
                assert self.kv.get(self._slot(s, p)) == hash(tuple(tokens[:p + 1])), \
                    f"{s.request_id}: stale KV at position {p}"
        return ModelRunnerOutput(
            sampled_token_ids=[self.token_fn(s.request) if s.sample else None
                               for s in out.scheduled],
            logprobs=[TokenLogprobs([self.token_fn(s.request)], [-0.5], 1)
                      if s.sample and s.request.params.logprobs is not None else None
                      for s in out.scheduled],
            prompt_logprobs=[self._prompt_logprobs(s) for s in out.scheduled])

    @staticmethod
    def _prompt_logprobs(s):
        r = s.request
        if r.params.prompt_logprobs is None:
            return None
        end = min(s.start_pos + s.num_tokens, r.num_prompt_tokens - 1)
        return [TokenLogprobs([r.prompt_token_ids[p + 1]], [-float(p)], 1)
                for p in range(s.start_pos, end)]


@pytest.fixture
def make_sched():
    """Build schedulers; after the test each one is consistent and, when idle, holds nothing."""
    made = []

    def make(num_blocks=16, block_size=4, max_model_len=64, budget=64, max_num_seqs=8,
             chunked=True, caching=True):
        s = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                      enable_chunked_prefill=chunked),
                      CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                      num_blocks, max_model_len)
        made.append(s)
        return s, FakeRunner(block_size)

    yield make
    for s in made:
        kv = s.kv_cache_manager
        kv.check_invariants()
        if not s.has_unfinished_requests():
            assert kv.num_free_blocks == kv.num_blocks and not kv.req_blocks
            assert not s.running and not s.waiting


_clock = iter(range(10**6))


def req(rid, tokens, priority=0, eos=(), **params):
    params.setdefault("max_tokens", 4)
    return Request(rid, list(tokens), SamplingParams(**params), eos_token_ids=list(eos),
                   priority=priority, arrival_time=float(next(_clock)))


def step(sched, runner):
    out = sched.schedule()
    outputs = sched.update_from_output(out, runner.execute(out)) if out.scheduled else []
    sched.kv_cache_manager.check_invariants()
    return out, outputs


def run_all(sched, runner, max_steps=200):
    """Step until idle; returns request id -> list of its EngineCoreOutputs."""
    results: dict[str, list] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return results
        for o in step(sched, runner)[1]:
            results.setdefault(o.request_id, []).append(o)
    raise AssertionError("scheduler did not drain")


def tokens_of(outs):
    return [t for o in outs for t in o.new_token_ids]


def test_single_request_lifecycle(make_sched):
    sched, runner = make_sched()
    sched.add_request(req("a", range(10), max_tokens=3))
    out, outs = step(sched, runner)
    assert [(s.request_id, s.start_pos, s.num_tokens, s.sample, s.block_ids)
            for s in out.scheduled] == [("a", 0, 10, True, [0, 1, 2])]
    assert out.num_batched_tokens == 10 and out.finished_req_ids == set()
    assert [(o.new_token_ids, o.finish_reason) for o in outs] == [([100], None)]
    results = run_all(sched, runner)
    assert runner.steps[1:] == [[("a", 10, 1, True)], [("a", 11, 1, True)]]
    assert tokens_of(results["a"]) == [101, 102]
    assert results["a"][-1].finish_reason == "length"
    assert sched.schedule().finished_req_ids == {"a"}
    assert sched.schedule().finished_req_ids == set()


def test_prefix_hit_through_scheduler(make_sched):
    sched, runner = make_sched()
    sched.add_request(req("a", range(10), max_tokens=1))
    run_all(sched, runner)
    b = req("b", [*range(8), 50, 51, 52], max_tokens=1)
    sched.add_request(b)
    out, outs = step(sched, runner)
    assert runner.steps[-1] == [("b", 8, 3, True)]
    assert out.scheduled[0].block_ids == [0, 1, 3]
    assert outs[0].num_cached_tokens == 8 and b.num_cached_tokens == 8
    stats = sched.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (21, 8)
    assert stats.num_batched_tokens == 3


def test_identical_prompts_in_one_step_share_blocks(make_sched):
    # The first request's full blocks are registered when allocated, so the second one hits
    # them in the same step; the fake runner checks the KV is there when it is read.
    sched, runner = make_sched()
    sched.add_request(req("a", range(10), max_tokens=2))
    sched.add_request(req("b", range(10), max_tokens=2))
    out, _ = step(sched, runner)
    assert runner.steps[0] == [("a", 0, 10, True), ("b", 8, 2, True)]
    assert [s.block_ids for s in out.scheduled] == [[0, 1, 2], [0, 1, 3]]
    run_all(sched, runner)


def test_preemption_keeps_outputs_and_resumes_with_prefix_hit(make_sched):
    sched, runner = make_sched(num_blocks=4, max_model_len=16)
    a = req("a", range(1, 7), max_tokens=6)
    b = req("b", range(11, 17), max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    results = {}
    for _ in range(3):
        for o in step(sched, runner)[1]:
            results.setdefault(o.request_id, []).append(o)
    assert sched.kv_cache_manager.get_block_ids("b") == [2, 3]
    assert b.num_output_tokens == 3
    # a needs a third block at position 8: b (the later arrival) is preempted.
    out, outs = step(sched, runner)
    results["a"].extend(outs)
    assert out.preempted_req_ids == {"b"}
    assert runner.steps[-1] == [("a", 8, 1, True)]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.get_stats().num_preemptions == 1
    assert sched.kv_cache_manager.get_block_ids("a") == [0, 1, 3]
    for rid, outs in run_all(sched, runner).items():
        results.setdefault(rid, []).extend(outs)
    # b resumed once a finished: its first block (2) was still cached, its second (3) had
    # gone to a; it recomputed positions 4..8 (prompt + 3 outputs) and went on.
    resume = [st for st in runner.steps if st and st[0][0] == "b"][0]
    assert resume == [("b", 4, 5, True)]
    assert tokens_of(results["a"]) == tokens_of(results["b"]) == [100, 101, 102, 103, 104, 105]
    assert results["b"][-1].finish_reason == "length"
    assert b.output_token_ids == [100, 101, 102, 103, 104, 105]
    assert b.num_cached_tokens == 0   # set at the first admission, kept across the preemption


def test_preemption_victim_is_lowest_priority(make_sched):
    sched, runner = make_sched(num_blocks=4, max_model_len=16)
    low = req("low", range(1, 7), priority=1, max_tokens=6)
    sched.add_request(low)
    step(sched, runner)
    high = req("high", range(11, 17), priority=0, max_tokens=6)
    sched.add_request(high)
    step(sched, runner)
    assert runner.steps[-1] == [("low", 6, 1, True), ("high", 0, 6, True)]
    step(sched, runner)
    assert runner.steps[-1] == [("high", 6, 1, True), ("low", 7, 1, True)]
    # low needs a third block and is itself the worst: it is preempted, high goes on.
    out, _ = step(sched, runner)
    assert runner.steps[-1] == [("high", 7, 1, True)] and out.preempted_req_ids == {"low"}
    results = run_all(sched, runner)
    assert (low.num_preemptions, high.num_preemptions) == (1, 0)
    assert len(low.output_token_ids) == len(high.output_token_ids) == 6
    assert results["low"][-1].finish_reason == "length"


def test_priority_orders_admission(make_sched):
    sched, runner = make_sched(max_num_seqs=1)
    for rid, prio in [("p2", 2), ("p0a", 0), ("p1", 1), ("p0b", 0)]:
        sched.add_request(req(rid, range(5), priority=prio, max_tokens=1))
    run_all(sched, runner)
    assert [st[0][0] for st in runner.steps] == ["p0a", "p0b", "p1", "p2"]


def test_chunked_prefill_mixes_with_decodes(make_sched):
    sched, runner = make_sched(num_blocks=32, max_model_len=64, budget=18)
    sched.add_request(req("a", range(4), max_tokens=10))
    sched.add_request(req("b", range(10, 14), max_tokens=10))
    step(sched, runner)
    sched.add_request(req("long", range(20, 60), max_tokens=2))
    outs = [step(sched, runner)[1] for _ in range(4)]
    assert runner.steps == [
        [("a", 0, 4, True), ("b", 0, 4, True)],
        [("a", 4, 1, True), ("b", 4, 1, True), ("long", 0, 16, False)],
        [("a", 5, 1, True), ("b", 5, 1, True), ("long", 16, 16, False)],
        [("a", 6, 1, True), ("b", 6, 1, True), ("long", 32, 8, True)],
        [("a", 7, 1, True), ("b", 7, 1, True), ("long", 40, 1, True)],
    ]
    # The long prompt produces output only once its last chunk ran.
    assert [sorted(o.request_id for o in step_outs) for step_outs in outs[:3]] == \
        [["a", "b"], ["a", "b"], ["a", "b", "long"]]
    run_all(sched, runner)


def test_without_chunking_whole_prompts_only(make_sched):
    sched, runner = make_sched(max_model_len=16, budget=16, chunked=False)
    sched.add_request(req("a", range(10), max_tokens=2))
    sched.add_request(req("b", range(20, 30), max_tokens=2))
    sched.add_request(req("c", range(40, 42), max_tokens=2))   # fits, but FCFS: b goes first
    step(sched, runner)
    assert runner.steps[-1] == [("a", 0, 10, True)]
    step(sched, runner)
    assert runner.steps[-1] == [("a", 10, 1, True), ("b", 0, 10, True), ("c", 0, 2, True)]
    run_all(sched, runner)


def test_with_chunking_the_budget_is_filled(make_sched):
    sched, runner = make_sched(max_model_len=16, budget=16)
    sched.add_request(req("a", range(10), max_tokens=2))
    sched.add_request(req("b", range(20, 30), max_tokens=2))
    step(sched, runner)
    assert runner.steps[-1] == [("a", 0, 10, True), ("b", 0, 6, False)]
    run_all(sched, runner)


def test_max_num_seqs_caps_the_batch(make_sched):
    sched, runner = make_sched(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(req(rid, range(5), max_tokens=2))
    step(sched, runner)
    assert [s[0] for s in runner.steps[-1]] == ["a", "b"]
    assert sched.get_stats().num_running == 2 and sched.get_stats().num_waiting == 1
    step(sched, runner)                   # a and b finish
    step(sched, runner)
    assert [s[0] for s in runner.steps[-1]] == ["c"]
    run_all(sched, runner)


def test_abort_frees_blocks_at_once(make_sched):
    sched, runner = make_sched(max_num_seqs=1)
    sched.add_request(req("run", range(10), max_tokens=8))
    sched.add_request(req("wait", range(20, 30), max_tokens=8))
    step(sched, runner)
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == 13
    aborted = sched.abort_requests(["run", "wait", "unknown"])
    assert [r.request_id for r in aborted] == ["run", "wait"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert kv.num_free_blocks == 16 and not sched.has_unfinished_requests()
    assert sched.get_num_unfinished() == 0
    assert sched.schedule().finished_req_ids == {"run", "wait"}


def test_abort_between_schedule_and_update(make_sched):
    sched, runner = make_sched()
    sched.add_request(req("a", range(5)))
    sched.add_request(req("b", range(10, 15)))
    out = sched.schedule()
    runner_out = runner.execute(out)
    sched.abort_requests("a")
    outs = sched.update_from_output(out, runner_out)
    assert [o.request_id for o in outs] == ["b"]
    run_all(sched, runner)


def scripted(script):
    """A token_fn that emits script[rid][i] as the i-th output token."""
    return lambda r: script[r.request_id][r.num_output_tokens]


@pytest.mark.parametrize("params, script, tokens, reason, stop_reason", [
    (dict(), [5, 2, 9], [5, 2], "stop", None),
    (dict(ignore_eos=True, max_tokens=3), [5, 2, 9], [5, 2, 9], "length", None),
    (dict(stop_token_ids=[9]), [5, 9, 7], [5, 9], "stop", 9),
    (dict(stop_token_ids=[2]), [5, 2, 7], [5, 2], "stop", None),      # eos is checked first
    (dict(min_tokens=3), [2, 2, 2, 2], [2, 2, 2], "stop", None),
    (dict(min_tokens=2, stop_token_ids=[9]), [9, 9, 9], [9, 9], "stop", 9),
    (dict(max_tokens=2), [5, 6, 7], [5, 6], "length", None),
    (dict(max_tokens=None), [5, 6, 7, 8, 9], [5, 6, 7], "length", None),  # max_model_len 8
])
def test_stop_conditions(make_sched, params, script, tokens, reason, stop_reason):
    sched, runner = make_sched(max_model_len=8)
    runner.token_fn = scripted({"r": script})
    r = req("r", range(10, 15), eos=[2], **{"max_tokens": 10, **params})
    sched.add_request(r)
    outs = run_all(sched, runner)["r"]
    assert tokens_of(outs) == tokens
    assert [o.finish_reason for o in outs] == [None] * (len(tokens) - 1) + [reason]
    assert outs[-1].stop_reason == stop_reason == r.stop_reason


def test_logprobs_pass_through(make_sched):
    sched, runner = make_sched()
    sched.add_request(req("r", range(5), max_tokens=2, logprobs=1))
    sched.add_request(req("plain", range(10, 15), max_tokens=2))
    results = run_all(sched, runner)
    assert [o.new_logprobs for o in results["r"]] == [
        [TokenLogprobs([100], [-0.5], 1)], [TokenLogprobs([101], [-0.5], 1)]]
    assert all(o.new_logprobs is None for o in results["plain"])


def test_prompt_logprobs_get_no_hits_and_arrive_whole(make_sched):
    sched, runner = make_sched(budget=8)
    sched.add_request(req("warm", range(20), max_tokens=1))
    run_all(sched, runner)
    r = req("r", range(20), max_tokens=2, prompt_logprobs=0)
    sched.add_request(r)
    results = run_all(sched, runner)["r"]
    assert [st[0][:3] for st in runner.steps[-4:]] == [("r", 0, 8), ("r", 8, 8), ("r", 16, 4),
                                                       ("r", 20, 1)]
    assert r.num_cached_tokens == 0 and results[0].num_cached_tokens == 0
    expected = [TokenLogprobs([p + 1], [-float(p)], 1) for p in range(19)]
    assert results[0].prompt_logprobs == expected
    assert results[1].prompt_logprobs is None


def test_prompt_logprobs_restart_after_preemption(make_sched):
    # p is preempted in the middle of its prefill; what it accumulated is recomputed, not
    # duplicated.
    sched, runner = make_sched(num_blocks=6, max_model_len=24, budget=6)
    a = req("a", range(100, 104), max_tokens=10)
    sched.add_request(a)
    step(sched, runner)
    p = req("p", range(20), max_tokens=1, prompt_logprobs=0)
    sched.add_request(p)
    results = run_all(sched, runner)
    assert p.num_preemptions >= 1
    assert results["p"][0].prompt_logprobs == [
        TokenLogprobs([p + 1], [-float(p)], 1) for p in range(19)]


def test_scheduler_rejects_a_cache_smaller_than_max_model_len():
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 3, 16)


def test_unresolved_budget_gets_the_engine_default():
    cache = CacheConfig(block_size=4)
    assert Scheduler(SchedulerConfig(), cache, 64, 256).max_num_batched_tokens == 2048
    no_chunks = SchedulerConfig(enable_chunked_prefill=False)
    assert Scheduler(no_chunks, cache, 1024, 4096).max_num_batched_tokens == 4096


def test_duplicate_request_id_rejected(make_sched):
    sched, _ = make_sched()
    sched.add_request(req("a", range(3)))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(req("a", range(3)))
    sched.abort_requests(["a"])


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_drains_consistently(make_sched, seed):
    """Shared prefixes, a tiny cache, priorities and aborts: every request ends with the
    right number of tokens, the fake runner never reads stale KV, and nothing leaks."""
    rng = random.Random(seed)
    sched, runner = make_sched(num_blocks=12, block_size=4, max_model_len=40, budget=16,
                               max_num_seqs=4)
    prefixes = [[rng.randrange(1000) for _ in range(8)] for _ in range(3)]
    expect, aborted, reqs = {}, set(), {}
    for i in range(24):
        rid = f"r{i}"
        prompt = rng.choice(prefixes)[:rng.randrange(9)] + [rng.randrange(1000)
                                                            for _ in range(rng.randrange(1, 12))]
        max_tokens = rng.randrange(1, 10)
        reqs[rid] = req(rid, prompt, priority=rng.randrange(2), max_tokens=max_tokens)
        sched.add_request(reqs[rid])
        expect[rid] = min(max_tokens, 40 - len(prompt))
        if rng.random() < 0.5:
            for o in step(sched, runner)[1]:
                assert o.new_token_ids
        if rng.random() < 0.1:
            victim = f"r{rng.randrange(i + 1)}"
            if sched.abort_requests([victim]):
                aborted.add(victim)
    run_all(sched, runner, max_steps=1000)
    for rid, r in reqs.items():
        if rid not in aborted:
            assert r.num_output_tokens == expect[rid], rid
            assert r.output_token_ids == list(range(100, 100 + expect[rid]))
    stats = sched.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == stats.num_waiting == 0
