"""The machine's limits: memory bandwidth and matmul throughput (float32, bf16) at 1 and 2 threads.

    PYTHONPATH=. python benchmarks/hw_limits.py

Decode of one stream reads every weight once per token, so its ceiling is
bandwidth / bytes per token; batched decode and prefill are bounded by matmul
throughput (2 x parameters FLOPs per token). serve_bench divides its figures by
these (`limits()`), and this script records them (benchmarks/results/hw_limits.json, RESULTS.md).
Each figure is the best of a few short repeats (the box is shared: best-of
approximates what the hardware can do when it is not being fought over).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import preview, record, table  # noqa: E402
from model.loading import cpu_native_bf16  # noqa: E402

CACHE = ROOT / ".loopcord" / "hw_limits.json"  # serve_bench reads it rather than re-measuring
READ_BYTES = 1 << 30  # larger than any cache by far
MATMUL = (256, 2048, 2048)  # M, K, N: a decode batch / prefill chunk against one projection
REPEATS = 5


@dataclass(frozen=True)
class Limits:
    read_gbs: dict  # threads -> GB/s reading memory
    matmul_gflops: dict  # "float32"/"bfloat16" -> threads -> GFLOP/s
    bf16_native: bool  # the CPU advertises AVX-512 BF16 or AMX

    def decode_tok_s(self, bytes_per_token: float, threads: int) -> float:
        return self.read_gbs[str(threads)] * 1e9 / bytes_per_token

    def compute_tok_s(self, flops_per_token: float, dtype: str, threads: int) -> float:
        return self.matmul_gflops[dtype][str(threads)] * 1e9 / flops_per_token


def _best(fn, repeats=REPEATS) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(READ_BYTES // 4, dtype=torch.float32)
    return READ_BYTES / _best(lambda: x.sum()) / 1e9


def matmul_gflops(dtype_name: str, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    m, k, n = MATMUL
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    seconds = _best(lambda: a @ b)
    from model.packed_linear import onednn_bf16

    # oneDNN with a pre-packed weight (what the engine uses), where oneDNN has kernels for the dtype here
    if torch.backends.mkldnn.is_available() and (dtype != torch.bfloat16 or onednn_bf16()):
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), None)
        seconds = min(seconds, _best(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")))
    return 2 * m * k * n / seconds / 1e9


def measure() -> Limits:
    import torch

    before = torch.get_num_threads()
    try:
        read = {str(t): read_bandwidth(t) for t in (1, 2)}
        mm = {d: {str(t): matmul_gflops(d, t) for t in (1, 2)} for d in ("float32", "bfloat16")}
    finally:
        torch.set_num_threads(before)
    limits = Limits(read, mm, cpu_native_bf16())
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(asdict(limits)))
    return limits


def limits(remeasure: bool = False) -> Limits:
    """The cached measurement (measured now when there is none)."""
    if CACHE.exists() and not remeasure:
        return Limits(**json.loads(CACHE.read_text()))
    return measure()


def report(lim: Limits) -> dict:
    """The figures for `record`: text, the table, notes."""
    m, k, n = MATMUL
    rows = [["memory read bandwidth (GB/s, 1 GiB `sum`)", f"{lim.read_gbs['1']:.1f}", f"{lim.read_gbs['2']:.1f}"]]
    for d in ("float32", "bfloat16"):
        rows.append([f"{d} matmul {m}x{k}x{n} (GFLOP/s, best of aten and oneDNN packed)",
                     f"{lim.matmul_gflops[d]['1']:.0f}", f"{lim.matmul_gflops[d]['2']:.0f}"])
    return dict(
        text=[f"Best of {REPEATS} short runs on a shared machine. CPU advertises native bf16 (AVX-512 BF16/AMX): "
              f"**{lim.bf16_native}**."],
        tables=[table(["limit", "1 thread", "2 threads"], rows)],
        notes=["Decode ceiling for one stream = bandwidth / bytes of weights per token; batched decode and prefill "
               "ceiling = matmul GFLOP/s / (2 x parameters) tokens/s."])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    lim = measure()
    parts = report(lim)
    print(preview("hw_limits", **parts))
    record("hw_limits", **parts)


if __name__ == "__main__":
    main()
