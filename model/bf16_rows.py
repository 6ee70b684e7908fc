"""A bf16 GEMM for a few rows (decode of 1-4 streams) that reads the weight as one stream.

On a CPU with AVX-512 BF16 but no AMX (an AMD EPYC, Zen 4) oneDNN's bf16 kernels read a
decode step's weights at 12-14 GB/s on one thread at one row, where the memory gives 30:
they walk several output rows at once, and this CPU streams one sequential read far
faster than several interleaved ones (a hand-written kernel over 2 or 4 rows at a time
was as slow as oneDNN). This one takes the weight in nn.Linear's own [out, in] layout,
one output row after another, each a dot product of `vdpbf16ps` (bf16 pairs, float32
sums) against the few input rows held in L1: a SmolLM2 decode step's GEMMs 1.46x
oneDNN's at one row, 1.44x at 2, 1.10x at 4, level at 8 and slower beyond
(RESULTS.md: serve_bench_vs_vllm_bfloat16_smollm2). It runs on one thread: used when the
worker computes on one (`worker.cpu_threads: 1`, the default), where one core already
takes the whole bandwidth on such a box.

The C source is compiled at first use with the system's C compiler (`cc`, or $CC) into
the user's cache directory and loaded with ctypes; without a compiler, or on a CPU
without AVX-512 BF16, `kernel()` is None and oneDNN runs every row count, as before;
`LOOPCORD_BF16_ROWS=0` in the environment turns it off.
Rounding: each output is a float32 sum rounded once to bf16 (round to nearest even),
as oneDNN's; the order of the sums differs, a unit in the last place at most.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("loopcord.worker")

MAX_ROWS = 4  # rows from which oneDNN is as fast or faster (8: level; 16: 0.8x)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* y[m, n] = sum_k x[m, k] * w[n, k] for m < M (compile-time), n < N: one weight row at a time. */
static inline __attribute__((always_inline)) void rows(const uint16_t *x, const uint16_t *w, uint16_t *y,
                                                       const int M, int K, int N) {
    const int full = K & ~31;
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);
    for (int n = 0; n < N; n++) {
        const uint16_t *wr = w + (size_t)n * K;
        __m512 acc[4];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int k = 0; k < full; k += 32) {
            __m512i wv = _mm512_loadu_si512((const void *)(wr + k));
            for (int m = 0; m < M; m++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + (size_t)m * K + k));
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv, (__m512bh)xv);
            }
        }
        if (full < K) {
            __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + full);
            for (int m = 0; m < M; m++) {
                __m512i xv = _mm512_maskz_loadu_epi16(tail, x + (size_t)m * K + full);
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv, (__m512bh)xv);
            }
        }
        for (int m = 0; m < M; m++) y[(size_t)m * N + n] = to_bf16(_mm512_reduce_add_ps(acc[m]));
    }
}

int loopcord_bf16_rows(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int K, int N) {
    switch (M) {
        case 1: rows(x, w, y, 1, K, N); return 0;
        case 2: rows(x, w, y, 2, K, N); return 0;
        case 3: rows(x, w, y, 3, K, N); return 0;
        case 4: rows(x, w, y, 4, K, N); return 0;
        default: return -1;
    }
}
"""

FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-shared", "-fPIC")

_kernel: Optional[ctypes._CFuncPtr] = None
_tried = False


def cpu_supported() -> bool:
    """AVX-512 BF16 without AMX tiles: where this kernel was measured to beat oneDNN (on an AMX
    CPU oneDNN's bf16 kernels run on the tiles; not measured against this one)."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(avx512_bf16 and avx512_bf16()) and not bool(amx and amx())


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loopcord" / "kernels"


def _build(compiler: str) -> Path:
    """The compiled library, built once per source, flags and compiler into the cache directory."""
    digest = hashlib.sha256("\0".join((SOURCE, compiler) + FLAGS).encode()).hexdigest()[:16]
    out = _cache_dir() / f"bf16_rows-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "bf16_rows.c", Path(tmp) / "bf16_rows.so"
        src.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(lib)], check=True, capture_output=True, timeout=120)
        os.replace(lib, out)  # atomic: two workers building at once both end with a whole file
    return out


def kernel():
    """The compiled function, or None where it cannot run (CPU, no compiler, a failed build:
    logged once); built and loaded on first call."""
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    if not cpu_supported() or os.environ.get("LOOPCORD_BF16_ROWS") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        fn = ctypes.CDLL(str(_build(compiler))).loopcord_bf16_rows
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.info("bf16 few-row kernel not built (%s%s): oneDNN runs every bf16 GEMM", exc,
                 ": " + detail.decode(errors="replace").strip()[:300] if detail else "")
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    _kernel = fn
    return fn


def usable(rows: int) -> bool:
    """Whether `matmul` runs a GEMM of this many rows (the worker computes on one thread)."""
    return rows <= MAX_ROWS and torch.get_num_threads() == 1 and _kernel is not None


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N], bf16, for 1 <= M <= MAX_ROWS (`usable`)."""
    m, k = x.shape
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.shape[1] != k or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"bf16_rows.matmul: bf16 x [1..{MAX_ROWS}, K] and weight [N, K], got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    if not weight.is_contiguous():
        raise ValueError("bf16_rows.matmul: the weight must be contiguous")
    y = torch.empty((m, weight.shape[0]), dtype=torch.bfloat16)
    _kernel(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, k, weight.shape[0])
    return y
