"""Prometheus metrics of one engine (own registry, so several engines can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def labelled(metric):
            return metric.labels(model_name=model_name)

        self.running = labelled(Gauge("engine_num_requests_running", "Sequences in the running batch", labels,
                                      registry=r))
        self.waiting = labelled(Gauge("engine_num_requests_waiting", "Sequences waiting to be scheduled", labels,
                                      registry=r))
        self.kv_usage = labelled(Gauge("engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                       labels, registry=r))
        self.hit_rate = labelled(Gauge("engine_prefix_cache_hit_rate",
                                       "Prompt tokens served from the prefix cache / prompt tokens looked up",
                                       labels, registry=r))
        self.prefix_queries = labelled(Counter("engine_prefix_cache_queries",
                                               "Prompt tokens looked up in the prefix cache", labels, registry=r))
        self.prefix_hits = labelled(Counter("engine_prefix_cache_hits",
                                            "Prompt tokens found in the prefix cache", labels, registry=r))
        self.prompt_tokens = labelled(Counter("engine_prompt_tokens", "Prompt tokens of admitted requests",
                                              labels, registry=r))
        self.generation_tokens = labelled(Counter("engine_generation_tokens", "Generated tokens", labels,
                                                  registry=r))
        self.preemptions = labelled(Counter("engine_preemptions", "Sequences preempted for lack of KV blocks",
                                            labels, registry=r))
        self.ttft = labelled(Histogram("engine_time_to_first_token_seconds", "Time to first token", labels,
                                       buckets=_LATENCY_BUCKETS, registry=r))
        self.tpot = labelled(Histogram("engine_time_per_output_token_seconds",
                                       "Mean time between output tokens of a finished request", labels,
                                       buckets=_TPOT_BUCKETS, registry=r))
        self.e2e = labelled(Histogram("engine_e2e_request_latency_seconds", "Arrival to finish", labels,
                                      buckets=_LATENCY_BUCKETS, registry=r))
        self._finished = Counter("engine_requests_finished", "Finished requests by finish reason",
                                 ["model_name", "finish_reason"], registry=r)
        self._model_name = model_name
        self._seen_queries = self._seen_hits = self._seen_preemptions = 0

    def observe_gauges(self, engine) -> None:
        """Batch and pool occupancy; also called at scrape time (aborts change them between steps)."""
        sched = engine.scheduler
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(sched.block_manager.usage)

    def observe_step(self, engine) -> None:
        sched = engine.scheduler
        bm = sched.block_manager
        self.observe_gauges(engine)
        if bm.prefix_queries > self._seen_queries:
            self.prefix_queries.inc(bm.prefix_queries - self._seen_queries)
            self.prefix_hits.inc(bm.prefix_hits - self._seen_hits)
            self._seen_queries, self._seen_hits = bm.prefix_queries, bm.prefix_hits
            self.hit_rate.set(bm.prefix_hits / bm.prefix_queries)
        if sched.num_preemptions > self._seen_preemptions:
            self.preemptions.inc(sched.num_preemptions - self._seen_preemptions)
            self._seen_preemptions = sched.num_preemptions

    def observe_finished(self, arrival: float, first_token: float | None, finished: float, num_output: int,
                         reason: str) -> None:
        self._finished.labels(model_name=self._model_name, finish_reason=reason).inc()
        self.e2e.observe(finished - arrival)
        if first_token is not None and num_output > 1:
            self.tpot.observe((finished - first_token) / (num_output - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EmbeddingMetrics:
    """An embedding engine's metrics, named like the generative engine's where they mean the same."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels, r = ["model_name"], self.registry

        def labelled(metric):
            return metric.labels(model_name=model_name)

        self.waiting = labelled(Gauge("engine_num_requests_waiting", "Requests with inputs waiting to be scheduled",
                                      labels, registry=r))
        self.prompt_tokens = labelled(Counter("engine_prompt_tokens", "Input tokens of admitted requests", labels,
                                              registry=r))
        self.inputs = labelled(Counter("engine_embedding_inputs", "Inputs embedded", labels, registry=r))
        self.batch_size = labelled(Histogram("engine_embedding_batch_size", "Inputs per encoder pass", labels,
                                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r))
        self.e2e = labelled(Histogram("engine_e2e_request_latency_seconds", "Arrival to finish", labels,
                                      buckets=_LATENCY_BUCKETS, registry=r))

    def observe_gauges(self, engine) -> None:
        self.waiting.set(len(engine.scheduler.waiting))

    def observe_step(self, engine, num_inputs: int) -> None:
        self.observe_gauges(engine)
        self.inputs.inc(num_inputs)
        self.batch_size.observe(num_inputs)

    def observe_finished(self, arrival: float, finished: float) -> None:
        self.e2e.observe(finished - arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
