"""Prometheus metrics for the worker, on `prometheus_client` (as vLLM's are).

Counters, gauges and histograms updated from the engine thread and the HTTP
loop (prometheus_client's metrics are thread-safe), rendered by `render()` for
GET /metrics in the Prometheus text format. Names follow vLLM's where one
exists, under the `loopcord_worker_` prefix. Each `WorkerMetrics` has its own
registry, so several workers (or tests) in one process never share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no `_created` series: vLLM turns them off too; they are noise on /metrics

PREFIX = "loopcord_worker_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class WorkerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        # prometheus_client adds the _total suffix to counters itself.
        self._requests = Counter(f"{p}requests", "Chat completion requests by HTTP status.", ["status"], registry=r)
        self._prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self._generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", registry=r)
        self._adapter_loads = Counter(f"{p}adapter_loads", "LoRA adapter loads (hot-swaps included).", registry=r)
        self._waiting = Gauge(f"{p}num_requests_waiting", "Requests queued, not yet running.", registry=r)
        self._running = Gauge(f"{p}num_requests_running", "Sequences in the running batch.", registry=r)
        self._hist = {
            "ttft": Histogram(f"{p}time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=TTFT_BUCKETS, registry=r),
            "tpot": Histogram(f"{p}time_per_output_token_seconds", "Time between output tokens of a sequence.",
                              buckets=TPOT_BUCKETS, registry=r),
            "batch_size": Histogram(f"{p}batch_size", "Sequences per decode step.", buckets=BATCH_BUCKETS,
                                    registry=r),
        }

    def request_done(self, status: int) -> None:
        self._requests.labels(status=str(status)).inc()

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self._prompt_tokens.inc(prompt)
        if generated:
            self._generation_tokens.inc(generated)

    def observe(self, hist: str, value: float) -> None:
        """`hist`: "ttft", "tpot" or "batch_size"."""
        self._hist[hist].observe(value)

    def set_load(self, queue_depth: int, running: int) -> None:
        self._waiting.set(queue_depth)
        self._running.set(running)

    def adapter_loaded(self) -> None:
        self._adapter_loads.inc()

    @property
    def adapter_loads(self) -> int:
        return int(self._adapter_loads._value.get())

    @adapter_loads.setter
    def adapter_loads(self, value: int) -> None:  # `metrics.adapter_loads += 1` keeps working
        self._adapter_loads.inc(max(0, value - self.adapter_loads))

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
