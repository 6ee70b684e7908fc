"""Prometheus text-format metrics for the worker, with no dependency.

Counters, gauges and histograms updated from the engine thread and the HTTP
loop (hence the lock), rendered by `render()` for GET /metrics. Names follow
vLLM's where one exists, under the `loopcord_worker_` prefix.
"""

from __future__ import annotations

import threading
from collections import defaultdict

PREFIX = "loopcord_worker_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}", f"{name}_count {self.total}"]
        return out


class WorkerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # HTTP status -> count (chat completions)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_depth = 0
        self.running = 0
        self.adapter_loads = 0

    def request_done(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe(self, hist: str, value: float) -> None:
        with self._lock:
            getattr(self, hist).observe(value)

    def set_load(self, queue_depth: int, running: int) -> None:
        with self._lock:
            self.queue_depth, self.running = queue_depth, running

    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}requests_total Chat completion requests by HTTP status.",
                     f"# TYPE {p}requests_total counter"]
            lines += [f'{p}requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            for name, value, kind, help_ in (
                ("prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens prefilled."),
                ("generation_tokens_total", self.generation_tokens, "counter", "Tokens generated."),
                ("adapter_loads_total", self.adapter_loads, "counter", "LoRA adapter loads (hot-swaps included)."),
                ("num_requests_waiting", self.queue_depth, "gauge", "Requests queued, not yet running."),
                ("num_requests_running", self.running, "gauge", "Sequences in the running batch."),
            ):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
            for name, hist, help_ in (
                ("time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
                ("time_per_output_token_seconds", self.tpot, "Time between output tokens of a sequence."),
                ("batch_size", self.batch_size, "Sequences per decode step."),
            ):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram"] + hist.lines(p + name)
        return "\n".join(lines) + "\n"
