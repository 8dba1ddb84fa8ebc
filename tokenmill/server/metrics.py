"""Prometheus metrics, named as vLLM names them, under ``tokenmill:`` with a model_name label.

One registry per app (no process-wide globals). Engine-side numbers arrive with every step's
``SchedulerStats`` (cumulative counters become increments here); request-side numbers are
recorded by the serving layer as each request finishes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

from tokenmill.engine.interfaces import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = reg = CollectorRegistry()
        lab = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"tokenmill:{name}", doc, lab, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(f"tokenmill:{name}", doc, lab, registry=reg).labels(model_name)

        def hist(name, doc, buckets=_LATENCY_BUCKETS):
            return Histogram(f"tokenmill:{name}", doc, lab, buckets=buckets,
                             registry=reg).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc",
                              "Fraction of KV blocks held by requests (1 = full).")
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted by the scheduler.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter("tokenmill:request_success", "Finished requests.",
                                ["model_name", "finished_reason"], registry=reg)
        self._model = model_name
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue = hist("request_queue_time_seconds", "Time waiting before first scheduled.")
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens computed per step.",
                                     _TOKEN_BUCKETS)
        self._last = SchedulerStats()

    def record_stats(self, s: SchedulerStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        last = self._last
        # NOTE: the core's counters are cumulative; Prometheus counters take increments.
        self.prefix_queries.inc(max(0, s.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_hits.inc(max(0, s.prefix_cache_hits - last.prefix_cache_hits))
        self.preemptions.inc(max(0, s.num_preemptions - last.num_preemptions))
        if s.num_batched_tokens:
            self.iteration_tokens.observe(s.num_batched_tokens)
        self._last = s

    def record_finished(self, *, prompt_tokens: int, generation_tokens: int,
                        finish_reasons: list[str], e2e: float, ttft: float | None,
                        queue_time: float | None) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        for reason in finish_reasons:
            self._success.labels(self._model, reason).inc()
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
        if queue_time is not None:
            self.queue.observe(queue_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
