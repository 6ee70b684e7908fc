"""A bf16 GEMM for a few rows (decode of 1-4 streams) that reads the weight as one stream.

On a CPU with AVX-512 BF16 but no AMX (an AMD EPYC, Zen 4) oneDNN's bf16 kernels read a
decode step's weights at 12-14 GB/s on one thread at one row, where the memory gives 30:
this CPU streams one sequential read far faster than several interleaved ones (a kernel
walking 2 or 4 rows of nn.Linear's [out, in] weight at once was as slow as oneDNN, one row
at a time 28 GB/s). So the weight is copied once (`pack`) with each block of 4 output rows
interleaved by 32 columns, and the kernel reads a block as one stream, each output a dot
product of `vdpbf16ps` (bf16 pairs, float32 sums) against the few input rows held in L1:
a SmolLM2 decode step's GEMMs 10.3 ms against oneDNN's 22 at one row, 11.4 against 17 at
4; at 8 rows level and slower beyond, where oneDNN keeps them. It runs on one thread: used
when the worker computes on one (`worker.cpu_threads: 1`, the default), where one core
already takes the whole bandwidth on such a box.

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

BLOCK = 4  # output rows interleaved in one stream (see `pack`)

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

/* R output rows n0.. from their packed block wb ([Kp/32][R][32]) for M input rows (compile-time). */
static inline __attribute__((always_inline)) void block(const uint16_t *x, const uint16_t *wb, uint16_t *y,
                                                        const int M, const int R, int K, int N, int n0) {
    const int full = K & ~31;
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++) for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    for (int k = 0; k < full; k += 32) {
        __m512i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_si512((const void *)(wb + (size_t)k * R + r * 32));
        for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + (size_t)m * K + k));
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    if (full < K) {  /* the weight's padding is zeros; the input's tail is read masked */
        __m512i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_si512((const void *)(wb + (size_t)full * R + r * 32));
        for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_maskz_loadu_epi16(tail, x + (size_t)m * K + full);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[(size_t)m * N + n0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r][m]));
}

static inline __attribute__((always_inline)) void rows(const uint16_t *x, const uint16_t *w, uint16_t *y,
                                                       const int M, int K, int N) {
    const size_t kp = (size_t)((K + 31) & ~31);
    const int blocked = N & ~3;
    for (int n = 0; n < blocked; n += 4) block(x, w + (size_t)n * kp, y, M, 4, K, N, n);
    for (int n = blocked; n < N; n++) block(x, w + (size_t)n * kp, y, M, 1, K, N, n);
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


def pack(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's [N, K] bf16 weight laid out for `matmul`: K padded with zeros to a multiple of 32,
    then each block of BLOCK output rows interleaved by 32 columns ([N/BLOCK][K/32][BLOCK][32]), so
    that the kernel reads BLOCK rows as one sequential stream; the last N % BLOCK rows follow whole.
    Flat, N * padded K elements."""
    n, k = weight.shape
    kp = -(-k // 32) * 32
    w = torch.nn.functional.pad(weight.detach(), (0, kp - k)) if kp != k else weight.detach()
    full = n // BLOCK * BLOCK
    blocks = w[:full].reshape(full // BLOCK, BLOCK, kp // 32, 32).transpose(1, 2).reshape(-1)
    return torch.cat([blocks, w[full:].reshape(-1)]).to(torch.bfloat16)


def matmul(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, n], bf16, for 1 <= M <= MAX_ROWS (`usable`), W [n, K] laid out by `pack`."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    if x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16 or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"bf16_rows.matmul: bf16 x [1..{MAX_ROWS}, K] and a packed bf16 weight, got "
                         f"{tuple(x.shape)} {x.dtype} and {packed.dtype}")
    if packed.dim() != 1 or packed.numel() != n * kp or not packed.is_contiguous():
        raise ValueError(f"bf16_rows.matmul: the weight must be `pack`ed from [{n}, {k}] ({n * kp} elements), "
                         f"got {tuple(packed.shape)}")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=torch.bfloat16)
    _kernel(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, k, n)
    return y
