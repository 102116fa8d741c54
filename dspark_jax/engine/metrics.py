"""The engine's Prometheus metrics, in a registry of its own (the HTTP server adds to it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dspark_jax.engine.scheduler import RoundFact

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class EngineMetrics:
    def __init__(self, *, gamma: int, pages_total: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dspark_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.running = Gauge("dspark_requests_running", "Requests holding a slot (prefilling or decoding)",
                             registry=r)
        self.waiting = Gauge("dspark_requests_waiting", "Requests waiting for a slot", registry=r)
        self.prompt_tokens = Counter("dspark_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("dspark_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dspark_inter_token_latency_seconds", "Time between output tokens (a multi-token "
                             "round spreads its time over its tokens)", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("dspark_request_latency_seconds", "Submission to finish", buckets=REQUEST_BUCKETS,
                                 registry=r)
        steps = [float(k) for k in range(1, max(gamma, 0) + 2)]
        self.accepted_length = Histogram("dspark_accepted_length", "Tokens committed per request-round (accepted "
                                         "drafts + 1)", buckets=steps, registry=r)
        self.verify_length = Histogram("dspark_verify_length", "Draft tokens the scheduler verified per "
                                       "request-round", buckets=[float(k) for k in range(0, max(gamma, 0) + 1)],
                                       registry=r)
        self.reached = Counter("dspark_position_reached", "Request-rounds that verified draft position k with "
                               "every earlier draft accepted", ["position"], registry=r)
        self.accepted = Counter("dspark_position_accepted", "Request-rounds that accepted draft position k",
                                ["position"], registry=r)
        self.acceptance_rate = Gauge("dspark_position_acceptance_rate", "Accepted / reached of draft position k "
                                     "since start", ["position"], registry=r)
        self.pages_used = Gauge("dspark_kv_pages_used", "KV cache pages in use", registry=r)
        self.pages_total = Gauge("dspark_kv_pages_total", "KV cache pages", registry=r)
        self.pages_total.set(pages_total)
        self.compiles = Counter("dspark_compilations_after_warmup", "XLA compilations after warm-up (a known "
                                "bucket should never compile)", registry=r)
        self.preemptions = Counter("dspark_preemptions", "Requests preempted (recomputed later) when KV pages "
                                   "ran out", registry=r)
        self.plain_steps = Counter("dspark_plain_steps", "Request-steps a speculative engine ran as plain decoding "
                                   "(past rounds' accepted lengths said a round gives fewer tokens/s); not "
                                   "request-rounds", registry=r)
        self.step_seconds = Gauge("dspark_step_seconds", "Moving mean wall seconds of a step by row bucket and kind "
                                  "(round or plain), as the plain-step gate measured them", ["rows", "kind"],
                                  registry=r)
        self.round_tokens = Gauge("dspark_round_tokens", "Moving mean tokens a round committed per live row, by "
                                  "row bucket, as the plain-step gate measured them", ["rows"], registry=r)
        self.gamma = gamma
        self._reached = [0] * gamma
        self._accepted = [0] * gamma

    def observe_round(self, fact: RoundFact) -> None:
        self.accepted_length.observe(fact.committed)
        if not self.gamma:
            return
        self.verify_length.observe(fact.length)
        for k in range(min(fact.length, fact.accepted + 1)):
            position = str(k + 1)
            self._reached[k] += 1
            self.reached.labels(position).inc()
            if fact.accepted > k:
                self._accepted[k] += 1
                self.accepted.labels(position).inc()
            self.acceptance_rate.labels(position).set(self._accepted[k] / self._reached[k])

    def observe_gate(self, gate) -> None:
        for (rows, plain), seconds in gate.seconds.items():
            self.step_seconds.labels(str(rows), "plain" if plain else "round").set(seconds)
        for rows, tau in gate.tau.items():
            self.round_tokens.labels(str(rows)).set(tau)

    def position_acceptance(self) -> list[float]:
        """Accepted / reached per draft position since start, up to the last position any round reached."""
        return [a / r for a, r in zip(self._accepted, self._reached) if r]
