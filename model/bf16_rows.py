"""GEMMs (bf16 and float32) and bf16 decode attention for CPUs with AVX-512 BF16 and no AMX
(AMD's Zen 4), reading each weight once, as one stream.

On such a CPU oneDNN's bf16 kernels read a decode step's weights at 12-14 GB/s on one thread
(MKL's and oneDNN's float32 12-21), where the memory gives 30: it streams one sequential read
far faster than several interleaved ones. These kernels take the weight copied once (`pack`)
into panels of 32 outputs, each panel [K/2][32][2] in bf16 ([K][32] in float32), so it is
read as one stream, and compute a panel for every input row, 8 rows at a time, while the panel
sits in L1: a pair of each input row, broadcast, meets 32 outputs' pairs in two `vdpbf16ps`
(bf16 pairs, float32 sums; float32: FMAs), with no horizontal sums. SmolLM2's GEMMs on one
thread against oneDNN's in bf16: 9.3 vs 20.3 ms at one row, 9.6 vs 17 at 4, 12.7 vs 22 at 8,
22.9 vs 30.5 at 16, 45.9 vs 54.0 at 32, 1.07-1.11x at 64-512 rows (prompt chunks); in float32
1.73x / 2.12x / 1.32x / 1.14x the torch.mm / oneDNN split at 1 / 8 / 32 / 128 rows. A kernel
walking nn.Linear's own rows, 2 or 4 at a time, was as slow as oneDNN. `attention` is decode
attention over a bf16 KV cache in float32 (torch's bf16 matmuls and SDPA there are far slower).
The lean decode loop (model.fast_decode) also calls three small ones where torch makes several
operations of a few microseconds each: `lora_add` (a sibling group's LoRA update, float32 as peft
adds it), `add_rms_norm` (the residual add and the next RMSNorm) and `rotary_store` (a bf16 step's
rotary embedding and its cache writes).

Layers take this layout (`packed_linear.Layout.ROWS`, the only copy) wherever the kernels run.
A call splits its panels (attention: its rows' key/value heads) across torch's own OpenMP
threads, as many as torch uses (`worker.cpu_threads`; the kernels are built with -fopenmp and the
loader hands them the libgomp torch already loaded, so there is one pool of threads, not two),
and each output is computed by one thread in one order: the same numbers on any thread count.
On both cores of a 2-core Zen 4 against one, SmolLM2's bf16 GEMMs take 9.3 / 9.3 / 23 / 253 ms
at 1 / 8 / 32 / 400 rows against 11.2 / 14.8 / 44 / 498 (oneDNN on two: 19 / 23 / 38 / 275).
The C source is compiled at first use with the system's C compiler (`cc`, or $CC) into the
user's cache directory and loaded with ctypes; without a compiler, or on another CPU, `kernel()`
is None and nothing changes; `LOOPCORD_BF16_ROWS=0` in the environment turns them off. Where a
second OpenMP runtime would be loaded beside torch's, they run on the calling thread alone.
Rounding: each bf16 output is a float32 sum rounded once to bf16 (round to nearest even), as
oneDNN's; the order of the sums differs.
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


PANEL = 32  # outputs a panel holds (the last may hold 16); see `pack`

SOURCE = r"""
#include <immintrin.h>
#include <math.h>  /* INFINITY */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* 16 bf16 values widened to float32 (exact: bf16 is float32's upper half) */
static inline __m512 widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
/* float32 rounded to bf16 (nearest even) and widened back */
static inline __m512 to_bf16(__m512 v) { return widen((__m256i)_mm512_cvtneps_pbh(v)); }

/* One panel of 16 * NB outputs (n0..) for MM input rows (both compile-time): the panel wp is
   [Kp/2][16 * NB][2], so each k pair of the panel is NB vectors of 16 outputs x 2 inputs, and a
   pair of each input row, broadcast, meets them in one vdpbf16ps: no horizontal sums. */
static inline __attribute__((always_inline)) void panel(const uint16_t *x, const uint16_t *wp, uint16_t *y,
                                                        const int NB, const int MM, int K, int N, int n0) {
    const int P = 16 * NB;
    __m512 acc[8][2];
    for (int m = 0; m < MM; m++) for (int b = 0; b < NB; b++) acc[m][b] = _mm512_setzero_ps();
    const int even = K & ~1;
    for (int k = 0; k < even; k += 2) {
        __m512i wv[2];
        for (int b = 0; b < NB; b++) wv[b] = _mm512_loadu_si512((const void *)(wp + (size_t)k * P + b * 32));
        for (int m = 0; m < MM; m++) {
            uint32_t pair; memcpy(&pair, x + (size_t)m * K + k, 4);
            __m512i xv = _mm512_set1_epi32((int)pair);
            for (int b = 0; b < NB; b++) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)wv[b], (__m512bh)xv);
        }
    }
    if (even < K) {  /* an odd K: the last input alone (the packed weight's pair is padded with zero) */
        __m512i wv[2];
        for (int b = 0; b < NB; b++) wv[b] = _mm512_loadu_si512((const void *)(wp + (size_t)even * P + b * 32));
        for (int m = 0; m < MM; m++) {
            __m512i xv = _mm512_set1_epi32((int)x[(size_t)m * K + even]);
            for (int b = 0; b < NB; b++) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)wv[b], (__m512bh)xv);
        }
    }
    for (int b = 0; b < NB; b++) {
        const int first = n0 + b * 16, valid = N - first;
        if (valid <= 0) break;
        const __mmask16 keep = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
        for (int m = 0; m < MM; m++) {  /* float32 sums rounded once to bf16, to nearest even */
            __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[m][b]);
            _mm256_mask_storeu_epi16((void *)(y + (size_t)m * N + first), keep, h);
        }
    }
}

#define ROWS(NB, MM) static void panel_##NB##_##MM(const uint16_t *x, const uint16_t *wp, uint16_t *y, \
                                                   int K, int N, int n0) { panel(x, wp, y, NB, MM, K, N, n0); }
#define ALL(NB) ROWS(NB, 1) ROWS(NB, 2) ROWS(NB, 3) ROWS(NB, 4) ROWS(NB, 5) ROWS(NB, 6) ROWS(NB, 7) ROWS(NB, 8)
ALL(1) ALL(2)

typedef void (*panel_fn)(const uint16_t *, const uint16_t *, uint16_t *, int, int, int);
static const panel_fn PANELS[2][8] = {
    {panel_1_1, panel_1_2, panel_1_3, panel_1_4, panel_1_5, panel_1_6, panel_1_7, panel_1_8},
    {panel_2_1, panel_2_2, panel_2_3, panel_2_4, panel_2_5, panel_2_6, panel_2_7, panel_2_8},
};

/* The float32 twin: panels [K][16 * NB] (no pairs), one FMA per input row and 16 outputs. */
static inline __attribute__((always_inline)) void panel32(const float *x, const float *wp, float *y,
                                                          const int NB, const int MM, int K, int N, int n0) {
    const int P = 16 * NB;
    __m512 acc[8][2];
    for (int m = 0; m < MM; m++) for (int b = 0; b < NB; b++) acc[m][b] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 wv[2];
        for (int b = 0; b < NB; b++) wv[b] = _mm512_loadu_ps(wp + (size_t)k * P + b * 16);
        for (int m = 0; m < MM; m++) {
            const __m512 xv = _mm512_set1_ps(x[(size_t)m * K + k]);
            for (int b = 0; b < NB; b++) acc[m][b] = _mm512_fmadd_ps(xv, wv[b], acc[m][b]);
        }
    }
    for (int b = 0; b < NB; b++) {
        const int first = n0 + b * 16, valid = N - first;
        if (valid <= 0) break;
        const __mmask16 keep = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
        for (int m = 0; m < MM; m++) _mm512_mask_storeu_ps(y + (size_t)m * N + first, keep, acc[m][b]);
    }
}

#define ROWS32(NB, MM) static void panel32_##NB##_##MM(const float *x, const float *wp, float *y, \
                                                       int K, int N, int n0) { panel32(x, wp, y, NB, MM, K, N, n0); }
#define ALL32(NB) ROWS32(NB, 1) ROWS32(NB, 2) ROWS32(NB, 3) ROWS32(NB, 4) ROWS32(NB, 5) ROWS32(NB, 6) \
                  ROWS32(NB, 7) ROWS32(NB, 8)
ALL32(1) ALL32(2)

typedef void (*panel32_fn)(const float *, const float *, float *, int, int, int);
static const panel32_fn PANELS32[2][8] = {
    {panel32_1_1, panel32_1_2, panel32_1_3, panel32_1_4, panel32_1_5, panel32_1_6, panel32_1_7, panel32_1_8},
    {panel32_2_1, panel32_2_2, panel32_2_3, panel32_2_4, panel32_2_5, panel32_2_6, panel32_2_7, panel32_2_8},
};

/* y[m, n] = sum_k x[m, k] * W[n, k] for m < M, n < N; w is W packed by bf16_rows.pack (its panels
   KP inputs long). Each panel is read from memory once and serves every input row, 8 at a time,
   from the cache. */
#define RUN_PANELS(TABLE, KP)                                                                  \
    if (M < 1 || K < 1 || N < 1 || threads < 1) return -1;                                     \
    const int np = (N + 15) & ~15, panels = (np + 31) / 32;                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1 && panels > 1)") \
    for (int p = 0; p < panels; p++) {                                                         \
        const int n0 = p * 32, nb = np - n0 >= 32 ? 2 : 1;                                     \
        for (int m0 = 0; m0 < M; m0 += 8) {                                                    \
            const int mm = M - m0 < 8 ? M - m0 : 8;                                            \
            TABLE[nb - 1][mm - 1](x + (size_t)m0 * K, w + (size_t)n0 * (KP), y + (size_t)m0 * N, K, N, n0); \
        }                                                                                      \
    }                                                                                          \
    return 0;

int loopcord_f32_rows(const float *x, const float *w, float *y, int M, int K, int N, int threads) {
    RUN_PANELS(PANELS32, (size_t)K)
}

/* e^x for x <= 0 (Cephes' expf: x = n ln2 + f, a degree-7 polynomial in f, times 2^n), 1-2 ulp */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* Decode attention, one new query per row, over a bf16 KV cache, in float32: row i's query heads
   q[i] ([heads][hd], contiguous) attend to positions 0..lengths[i]-1 of cache row i (kc, vc:
   [rows][kv_heads][capacity][hd], strides in elements), each group of heads / kv_heads query heads
   reading its key/value head once; out[i] is [heads * hd]. hd a multiple of 32, groups of at most 8. */
int loopcord_bf16_attention(const uint16_t *q, const uint16_t *kc, const uint16_t *vc, uint16_t *out,
                            const int32_t *lengths, int n, int heads, int kv_heads, int hd,
                            long long row_stride, long long head_stride, float scale, int longest, int threads,
                            float *scratch) {
    const int group = heads / kv_heads, chunks = hd / 32;
    if (hd % 32 || group > 8 || group * kv_heads != heads || chunks > 8 || threads < 1) return -1;
    for (int i = 0; i < n; i++) if (lengths[i] < 0 || lengths[i] > longest) return -1;
    const int jobs = n * kv_heads;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && jobs > 1)
    for (int job = 0; job < jobs; job++) {
        const int i = job / kv_heads, g = job % kv_heads, len = lengths[i];
#ifdef _OPENMP
        const int worker = omp_get_thread_num();
#else
        const int worker = 0;
#endif
        {
            const uint16_t *kb = kc + i * row_stride + g * head_stride, *vb = vc + i * row_stride + g * head_stride;
            const uint16_t *qg = q + ((size_t)i * heads + (size_t)g * group) * hd;
            float *scores = scratch + (size_t)worker * group * longest;  /* this thread's [group][len] */
            __m512i qv[8][8];
            for (int h = 0; h < group; h++)
                for (int c = 0; c < chunks; c++) qv[h][c] = _mm512_loadu_si512((const void *)(qg + h * hd + c * 32));
            float top[8];
            for (int h = 0; h < group; h++) top[h] = -INFINITY;
            for (int t = 0; t < len; t++) {
                const uint16_t *kt = kb + (size_t)t * hd;
                __m512i kv[8];
                for (int c = 0; c < chunks; c++) kv[c] = _mm512_loadu_si512((const void *)(kt + c * 32));
                for (int h = 0; h < group; h++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int c = 0; c < chunks; c++) acc = _mm512_dpbf16_ps(acc, (__m512bh)qv[h][c], (__m512bh)kv[c]);
                    const float sc = _mm512_reduce_add_ps(acc) * scale;
                    scores[h * len + t] = sc;
                    if (sc > top[h]) top[h] = sc;
                }
            }
            float total[8];
            for (int h = 0; h < group; h++) {
                const __m512 shift = _mm512_set1_ps(top[h]);
                __m512 sum = _mm512_setzero_ps();
                float *sh = scores + h * len;
                for (int t = 0; t < len; t += 16) {
                    const __mmask16 keep = len - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - t)) - 1);
                    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, sh + t), shift));
                    _mm512_mask_storeu_ps(sh + t, keep, e);
                    sum = _mm512_mask_add_ps(sum, keep, sum, e);
                }
                total[h] = _mm512_reduce_add_ps(sum);
            }
            __m512 acc[8][16];
            for (int h = 0; h < group; h++) for (int c = 0; c < 2 * chunks; c++) acc[h][c] = _mm512_setzero_ps();
            for (int t = 0; t < len; t++) {
                const uint16_t *vt = vb + (size_t)t * hd;
                __m512 vf[16];
                for (int c = 0; c < 2 * chunks; c++)
                    vf[c] = widen(_mm256_loadu_si256((const __m256i *)(vt + c * 16)));
                for (int h = 0; h < group; h++) {
                    const __m512 p = _mm512_set1_ps(scores[h * len + t]);
                    for (int c = 0; c < 2 * chunks; c++) acc[h][c] = _mm512_fmadd_ps(p, vf[c], acc[h][c]);
                }
            }
            for (int h = 0; h < group; h++) {
                const __m512 inv = _mm512_set1_ps(len > 0 ? 1.f / total[h] : 0.f);
                uint16_t *o = out + ((size_t)i * heads + (size_t)g * group + h) * hd;
                for (int c = 0; c < 2 * chunks; c++)
                    _mm256_storeu_si256((__m256i *)(o + c * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h][c], inv)));
            }
        }
    }
    return 0;
}

int loopcord_bf16_rows(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int K, int N, int threads) {
    RUN_PANELS(PANELS, (size_t)((K + 1) & ~1))
}

/* 16 values of a row of x (bf16 or float32) from k, as float32; past `valid` zero */
static inline __m512 load16(const void *x, int bf16, size_t k, __mmask16 keep) {
    if (bf16) return widen(_mm256_maskz_loadu_epi16(keep, (const uint16_t *)x + k));
    return _mm512_maskz_loadu_ps(keep, (const float *)x + k);
}

/* The rotary embedding of a decode step's queries and keys, and its keys and values stored, bf16:
   row i's qkv [heads + 2 kv_heads][hd] (rows `qkv_stride` apart), at position pos[i], turned by
   cos[i] and the sign-folded sin[i] ([hd] each: x * cos + cat(x2, x1) * sin, Llama's rotate-half,
   rounded as torch's mul and addcmul round: the product, then the sum), queries into q_out [n][heads][hd]
   and keys into kc[i][g][pos[i]], values copied to vc[i][g][pos[i]] (strides in elements). */
int loopcord_rotary_store(const uint16_t *qkv, long long qkv_stride, const uint16_t *cos, const uint16_t *sin,
                          const int64_t *pos, uint16_t *q_out, uint16_t *kc, uint16_t *vc, int n, int heads,
                          int kv_heads, int hd, long long row_stride, long long head_stride, int capacity) {
    if (n < 1 || hd % 32 || hd > 256 || heads < 1 || kv_heads < 1) return -1;
    for (int i = 0; i < n; i++) if (pos[i] < 0 || pos[i] >= capacity) return -1;
    const int half = hd / 2;
    for (int i = 0; i < n; i++) {
        const uint16_t *row = qkv + (size_t)i * qkv_stride, *ci = cos + (size_t)i * hd, *si = sin + (size_t)i * hd;
        for (int h = 0; h < heads + kv_heads; h++) {
            const uint16_t *x = row + (size_t)h * hd;
            uint16_t *dst = h < heads ? q_out + ((size_t)i * heads + h) * hd
                                      : kc + i * row_stride + (h - heads) * head_stride + pos[i] * (long long)hd;
            for (int j = 0; j < hd; j += 16) {
                const int partner = (j + half) % hd;  /* cat(x2, x1): 16 values from the other half */
                const __m512 xv = load16(x, 1, j, 0xffff), rv = load16(x, 1, partner, 0xffff);
                const __m512 c = load16(ci, 1, j, 0xffff), sv = load16(si, 1, j, 0xffff);
                const __m512 first = to_bf16(_mm512_mul_ps(xv, c));
                _mm256_storeu_si256((__m256i *)(dst + j), (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(rv, sv, first)));
            }
        }
        for (int g = 0; g < kv_heads; g++)
            memcpy(vc + i * row_stride + g * head_stride + pos[i] * (long long)hd, row + (size_t)(heads + kv_heads + g) * hd,
                   (size_t)hd * 2);
    }
    return 0;
}

/* A residual add and the next RMSNorm of a decoder layer, for n rows of d values (bf16, or float32
   where f32): h += delta (where delta is given; bf16: the sum rounded once, as torch's add), then
   out = w * rms_norm(h): bf16 as Llama's and Qwen2's RMSNorm compute it, normalised in float32,
   rounded to bf16, times the weight (rounded again); float32 as F.rms_norm. */
int loopcord_add_rms_norm(void *h, const void *delta, const void *w, void *out, int n, int d, float eps, int f32,
                          int threads) {
    if (n < 1 || d < 1 || threads < 1) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && n > 8)
    for (int i = 0; i < n; i++) {
        const size_t row = (size_t)i * d, es = f32 ? 4 : 2;
        char *hi = (char *)h + row * es;
        const char *di = delta ? (const char *)delta + row * es : 0;
        __m512 sq = _mm512_setzero_ps();
        for (int j = 0; j < d; j += 16) {
            const __mmask16 keep = d - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - j)) - 1);
            __m512 v = load16(hi, !f32, j, keep);
            if (di) {
                v = _mm512_add_ps(v, load16(di, !f32, j, keep));
                if (f32) _mm512_mask_storeu_ps((float *)hi + j, keep, v);
                else {
                    const __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
                    _mm256_mask_storeu_epi16((void *)((uint16_t *)hi + j), keep, r);
                    v = widen(r);
                }
            }
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        const float inv = 1.f / sqrtf(_mm512_reduce_add_ps(sq) / (float)d + eps);
        const __m512 s = _mm512_set1_ps(inv);
        for (int j = 0; j < d; j += 16) {
            const __mmask16 keep = d - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - j)) - 1);
            const __m512 v = _mm512_mul_ps(load16(hi, !f32, j, keep), s), wv = load16(w, !f32, j, keep);
            if (f32) _mm512_mask_storeu_ps((float *)out + row + j, keep, _mm512_mul_ps(v, wv));
            else {
                const __m512 nv = to_bf16(v);
                _mm256_mask_storeu_epi16((void *)((uint16_t *)out + row + j), keep,
                                         (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(nv, wv)));
            }
        }
    }
    return 0;
}

/* A LoRA update added in place, in float32 as peft adds a float32 adapter's, for MM (<= 4) rows:
   a = A x_i (A [R][K] float32, R a multiple of 4, zero rows padding it), then out[i][j] += sum_r
   Bt[r][j] a[r] for j < N (Bt: B transposed, the scaling folded in, float32, given as `bt`,
   panels of 16 outputs [Np/16][R][16], Np = N zero-padded to a multiple of 64, so that 4 panels
   are read side by side, each as one sequential read), out[i] a row of `ostride` elements (bf16:
   rounded once to nearest even; or float32). Four independent sums at a time: one would wait
   on each FMA's latency. */
static inline __attribute__((always_inline)) void lora_rows(const char *x, int x_bf16, const float *A,
                                                            const float *bt, char *out, int out_bf16, const int MM,
                                                            int K, int R, int N, long long ostride) {
    float a[4][1024];
    const size_t xs = x_bf16 ? 2 : 4, os = out_bf16 ? 2 : 4;
    for (int r0 = 0; r0 < R; r0 += 4) {
        __m512 acc[4][4];
        for (int m = 0; m < MM; m++) for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __mmask16 keep = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            __m512 xv[4];
            for (int m = 0; m < MM; m++) xv[m] = load16(x + (size_t)m * K * xs, x_bf16, k, keep);
            for (int q = 0; q < 4; q++) {
                const __m512 av = _mm512_maskz_loadu_ps(keep, A + (size_t)(r0 + q) * K + k);
                for (int m = 0; m < MM; m++) acc[m][q] = _mm512_fmadd_ps(av, xv[m], acc[m][q]);
            }
        }
        for (int m = 0; m < MM; m++) for (int q = 0; q < 4; q++) a[m][r0 + q] = _mm512_reduce_add_ps(acc[m][q]);
    }
    const int np = (N + 63) & ~63;
    for (int j = 0; j < np; j += 64) {
        __m512 sum[4][4];
        for (int m = 0; m < MM; m++) for (int c = 0; c < 4; c++) sum[m][c] = _mm512_setzero_ps();
        const float *pb = bt + (size_t)(j / 16) * R * 16;
        for (int r = 0; r < R; r++) {
            __m512 b[4];
            for (int c = 0; c < 4; c++) b[c] = _mm512_loadu_ps(pb + ((size_t)c * R + r) * 16);
            for (int m = 0; m < MM; m++) {
                const __m512 av = _mm512_set1_ps(a[m][r]);
                for (int c = 0; c < 4; c++) sum[m][c] = _mm512_fmadd_ps(av, b[c], sum[m][c]);
            }
        }
        for (int c = 0; c < 4; c++) {
            const int first = j + 16 * c, valid = N - first;
            if (valid <= 0) break;
            const __mmask16 keep = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
            for (int m = 0; m < MM; m++) {
                char *o = out + ((size_t)m * ostride + first) * os;
                if (out_bf16) {
                    const __m512 v = _mm512_add_ps(load16(o, 1, 0, keep), sum[m][c]);
                    _mm256_mask_storeu_epi16((void *)o, keep, (__m256i)_mm512_cvtneps_pbh(v));
                } else {
                    _mm512_mask_storeu_ps((float *)o, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, (float *)o), sum[m][c]));
                }
            }
        }
    }
}

#define LORA(MM) static void lora_##MM(const char *x, int xb, const float *A, const float *bt, char *out, int ob, \
                                       int K, int R, int N, long long os) { lora_rows(x, xb, A, bt, out, ob, MM, K, R, N, os); }
LORA(1) LORA(2) LORA(3) LORA(4)
typedef void (*lora_fn)(const char *, int, const float *, const float *, char *, int, int, int, int, long long);
static const lora_fn LORAS[4] = {lora_1, lora_2, lora_3, lora_4};

/* out[n][N] += (x[n][K] A^T) Bt for n rows, 4 at a time (see lora_rows) */
int loopcord_lora(const void *x, int x_bf16, const float *A, const float *bt, void *out, int out_bf16,
                  int n, int K, int R, int N, long long ostride, int threads) {
    if (n < 1 || K < 1 || R < 4 || R % 4 || R > 1024 || N < 1 || threads < 1) return -1;
    const int blocks = (n + 3) / 4;
    const size_t xs = x_bf16 ? 2 : 4, os = out_bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && blocks > 1)
    for (int blk = 0; blk < blocks; blk++) {
        const int i0 = blk * 4, mm = n - i0 < 4 ? n - i0 : 4;
        LORAS[mm - 1]((const char *)x + (size_t)i0 * K * xs, x_bf16, A, bt, (char *)out + (size_t)i0 * ostride * os,
                      out_bf16, K, R, N, ostride);
    }
    return 0;
}
"""

FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")

_kernel: Optional[ctypes._CFuncPtr] = None
_attention: Optional[ctypes._CFuncPtr] = None
_kernel_f32: Optional[ctypes._CFuncPtr] = None
_lora: Optional[ctypes._CFuncPtr] = None
_norm: Optional[ctypes._CFuncPtr] = None
_rotary: Optional[ctypes._CFuncPtr] = None
_shared_threads = False  # the kernels' OpenMP threads are torch's (see `threads`)
_tried = False


def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles (torch's check; False where this torch has none)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def cpu_supported() -> bool:
    """AVX-512 BF16 without AMX tiles: where these kernels were measured to beat oneDNN (on an AMX
    CPU oneDNN's bf16 kernels run on the tiles; not measured against these)."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(avx512_bf16 and avx512_bf16()) and not amx_tiles()


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
        lib = ctypes.CDLL(str(_build(compiler)))
        fn, fn32, attend = lib.loopcord_bf16_rows, lib.loopcord_f32_rows, lib.loopcord_bf16_attention
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.info("CPU kernels (model.bf16_rows) not built (%s%s): oneDNN and torch.mm run every GEMM", exc,
                 ": " + detail.decode(errors="replace").strip()[:300] if detail else "")
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4
    fn.restype = ctypes.c_int
    fn32.argtypes, fn32.restype = fn.argtypes, ctypes.c_int
    attend.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_longlong] * 2 + [
        ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    attend.restype = ctypes.c_int
    lora = lib.loopcord_lora
    lora.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [
        ctypes.c_int] * 5 + [ctypes.c_longlong, ctypes.c_int]
    lora.restype = ctypes.c_int
    norm = lib.loopcord_add_rms_norm
    norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    norm.restype = ctypes.c_int
    rotary = lib.loopcord_rotary_store
    rotary.argtypes = [ctypes.c_void_p, ctypes.c_longlong] + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [
        ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int]
    rotary.restype = ctypes.c_int
    global _attention, _kernel_f32, _shared_threads, _lora, _norm, _rotary
    _kernel, _kernel_f32, _attention, _lora, _norm, _rotary = fn, fn32, attend, lora, norm, rotary
    runtimes = _openmp_runtimes()
    _shared_threads = len(runtimes) == 1
    if not _shared_threads:  # a second pool beside torch's would fight it for the cores
        log.info("CPU kernels (model.bf16_rows): OpenMP runtimes %s, not torch's alone: the kernels run on "
                 "one thread", sorted(runtimes) or "none")
    log.info("CPU kernels (model.bf16_rows) loaded from %s", _cache_dir())
    return fn


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux): one, torch's own, where the
    kernels' `omp parallel` shares torch's threads (the loader reuses the libgomp.so.1 torch loaded)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps
            if "/" in line and any(Path(line.split()[-1]).name.startswith(n) for n in names)}


def threads() -> int:
    """Threads a kernel call splits its work across: torch's intra-op count, where the kernels
    share torch's OpenMP threads; otherwise 1."""
    return torch.get_num_threads() if _shared_threads else 1


def runs_here() -> bool:
    """Whether layers are laid out for these kernels: they run on this CPU (on torch's threads, see
    `threads`)."""
    return kernel() is not None


def padded(n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(outputs, inputs) of a [n, k] weight once `pack`ed: n up to a multiple of 16, k (bf16) of 2."""
    return -(-n // 16) * 16, (-(-k // 2) * 2 if dtype == torch.bfloat16 else k)


DTYPES = (torch.bfloat16, torch.float32)


def _panels(w: torch.Tensor, size: int, kp: int, bf16: bool) -> torch.Tensor:
    """One panel of `size` outputs, [K/2][size][2] (bf16) or [K][size] (float32), flat."""
    if bf16:
        return w.reshape(size, kp // 2, 2).transpose(0, 1).reshape(-1)
    return w.t().reshape(-1)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's [N, K] weight (bf16 or float32) laid out for `matmul`, flat: zero-padded to
    `padded(N, K)`, then cut into panels of PANEL outputs (the last of 16 where N is not a
    multiple of 32), each panel [K/2][its outputs][2] in bf16 (input pairs innermost, as
    `vdpbf16ps` takes them), [K][its outputs] in float32."""
    if weight.dtype not in DTYPES:
        raise ValueError(f"bf16_rows.pack: a bf16 or float32 weight, got {weight.dtype}")
    n, k = weight.shape
    np_, kp = padded(n, k, weight.dtype)
    w = torch.nn.functional.pad(weight.detach(), (0, kp - k, 0, np_ - n))
    parts, start = [], 0
    while start < np_:
        size = min(PANEL, np_ - start)
        parts.append(_panels(w[start:start + size], size, kp, weight.dtype == torch.bfloat16).contiguous())
        start += size
    return torch.cat(parts)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] weight back out of `pack`'s layout (a copy)."""
    np_, kp = padded(n, k, packed.dtype)
    parts, start, offset = [], 0, 0
    while start < np_:
        size = min(PANEL, np_ - start)
        flat = packed[offset:offset + size * kp]
        if packed.dtype == torch.bfloat16:
            parts.append(flat.view(kp // 2, size, 2).transpose(0, 1).reshape(size, kp))
        else:
            parts.append(flat.view(kp, size).t())
        start, offset = start + size, offset + size * kp
    return torch.cat(parts)[:n, :k].clone()


def matmul(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, n] in x's dtype (bf16 or float32), W [n, K] laid out by `pack` in that
    dtype; on the calling thread."""
    m, k = x.shape
    np_, kp = padded(n, k, x.dtype)
    if x.dtype not in DTYPES or packed.dtype != x.dtype or m < 1:
        raise ValueError(f"bf16_rows.matmul: x [M >= 1, K] and a packed weight of one dtype, bf16 or float32, "
                         f"got {tuple(x.shape)} {x.dtype} and {packed.dtype}")
    if packed.dim() != 1 or packed.numel() != np_ * kp or not packed.is_contiguous():
        raise ValueError(f"bf16_rows.matmul: the weight must be `pack`ed from [{n}, {k}] ({np_ * kp} elements), "
                         f"got {tuple(packed.shape)}")
    fn = _kernel if x.dtype == torch.bfloat16 else _kernel_f32
    if fn is None:
        raise RuntimeError("bf16_rows.matmul: the kernel is not loaded on this machine (see kernel())")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype)
    if fn(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, k, n, threads()) != 0:
        raise RuntimeError(f"bf16_rows.matmul: the kernel refused [{m}, {k}] x [{n}, {k}]")
    return y


def attention_covers(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `attention` takes a model of this shape (head size a multiple of 32 up to 256, at
    most 8 query heads per key/value head)."""
    return head_dim % 32 == 0 and head_dim <= 256 and heads % kv_heads == 0 and heads // kv_heads <= 8


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, longest: int,
              scale: float) -> torch.Tensor:
    """Decode attention in float32 over a bf16 cache: q [n, heads, hd] (one new query per row; row i
    is cache row i), k_cache / v_cache one layer's [rows >= n, kv_heads, capacity, hd], lengths [n]
    int32 with 1 <= lengths[i] <= longest <= capacity (row i attends to its positions
    0..lengths[i]-1; the caller's invariant, not read back here); returns [n, heads * hd] bf16. On a
    CPU without AMX torch's bf16 matmuls (and SDPA) run these small products far below the
    memory's speed and copy the cache views; this reads each row's keys and values once:
    SmolLM2's shapes 4x the matmuls at one row, 2.3-3x at 8, 1.7-3.6x at 32 (80-2048 positions)."""
    n, heads, hd = q.shape
    kv_heads = k_cache.shape[1]
    if _attention is None:
        raise RuntimeError("bf16_rows.attention: the kernel is not loaded on this machine (see kernel())")
    if (q.dtype, k_cache.dtype, v_cache.dtype) != (torch.bfloat16,) * 3 or lengths.dtype != torch.int32 \
            or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[0] < n \
            or k_cache.shape[3] != hd or k_cache.stride(3) != 1 or k_cache.stride(2) != hd \
            or not attention_covers(heads, kv_heads, hd) or lengths.shape != (n,) \
            or not 1 <= longest <= k_cache.shape[2]:
        raise ValueError(f"bf16_rows.attention: bf16 q [n, heads, hd] and caches [rows, kv_heads, capacity, hd] "
                         f"with lengths in 1..capacity, got q {tuple(q.shape)} {q.dtype}, cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}, lengths {tuple(lengths.shape)} {lengths.dtype}, "
                         f"longest {longest}")
    q = q.contiguous()
    lengths = lengths.contiguous()
    out = torch.empty((n, heads * hd), dtype=torch.bfloat16)
    workers = threads()
    scratch = torch.empty(workers * heads // kv_heads * longest, dtype=torch.float32)
    if _attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), lengths.data_ptr(), n, heads,
                  kv_heads, hd, k_cache.stride(0), k_cache.stride(1), scale, longest, workers,
                  scratch.data_ptr()) != 0:
        raise RuntimeError(f"bf16_rows.attention: the kernel refused heads {heads}, kv_heads {kv_heads}, hd {hd} "
                           f"or a length outside 0..{longest}")
    return out


MAX_LORA_RANK = 1024  # the ranks (summed over stacked siblings) `lora_add` takes


def lora_pack(a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA update's A [R, K] and Bt [R, N] (B transposed, the scaling folded in) laid out for
    `lora_add`, float32: A with zero rows up to a multiple of 4, Bt as panels of 16 outputs
    [N/16][R][16], flat, N zero-padded to a multiple of 64 (R as A's)."""
    r, n = bt.shape
    extra = -r % 4
    a = torch.nn.functional.pad(a.float(), (0, 0, 0, extra)).contiguous()
    padded_bt = torch.nn.functional.pad(bt.float(), (0, -n % 64, 0, extra))
    return a, padded_bt.view(r + extra, -1, 16).transpose(0, 1).contiguous().view(-1)


def lora_add(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, n_out: int, out: torch.Tensor) -> None:
    """out += (x @ A.T) @ Bt in float32, in place, as peft adds a float32 adapter's update to a
    layer's output (bf16: the sum rounded once): x [n, K] and out [n, n_out] (rows may be strided,
    columns contiguous) bf16 or float32; a and bt, A [R, K] and Bt [R, n_out] (B transposed, the
    scaling folded in) laid out by `lora_pack`; R at most MAX_LORA_RANK. One call where peft's
    update of a layer is five or six small torch operations."""
    n, k = x.shape
    r = a.shape[0]
    if _lora is None:
        raise RuntimeError("bf16_rows.lora_add: the kernel is not loaded on this machine (see kernel())")
    if x.dtype not in DTYPES or out.dtype not in DTYPES or (a.dtype, bt.dtype) != (torch.float32,) * 2 \
            or a.dim() != 2 or a.shape[1] != k or r % 4 or not 4 <= r <= MAX_LORA_RANK or n < 1 \
            or out.shape != (n, n_out) or bt.shape != (-(-n_out // 64) * 64 * r,) \
            or not (a.is_contiguous() and bt.is_contiguous()) or out.stride(1) != 1:
        raise ValueError(f"bf16_rows.lora_add: x [n, K], a and bt `lora_pack`ed from [R, K] and [R, {n_out}], "
                         f"out [n, {n_out}], got {tuple(x.shape)} {x.dtype}, {tuple(a.shape)} {a.dtype}, "
                         f"{tuple(bt.shape)} {bt.dtype}, {tuple(out.shape)} {out.dtype}")
    x = x.contiguous()
    if _lora(x.data_ptr(), x.dtype == torch.bfloat16, a.data_ptr(), bt.data_ptr(), out.data_ptr(),
             out.dtype == torch.bfloat16, n, k, r, n_out, out.stride(0), threads()) != 0:
        raise RuntimeError(f"bf16_rows.lora_add: the kernel refused n {n}, K {k}, R {r}, N {n_out}")


def add_rms_norm(h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A residual add in place and the next RMSNorm, for rows h [n, d] (bf16 or float32,
    contiguous): h += delta (where given, h's dtype and shape), then w * rms_norm(h) as Llama's and
    Qwen2's RMSNorm compute it (bf16: normalised in float32 and rounded, times the weight); a new
    tensor. Two calls where torch's are six to eight operations."""
    n, d = h.shape
    if _norm is None:
        raise RuntimeError("bf16_rows.add_rms_norm: the kernel is not loaded on this machine (see kernel())")
    if h.dtype not in DTYPES or weight.dtype != h.dtype or weight.shape != (d,) or not h.is_contiguous() \
            or not weight.is_contiguous() or (delta is not None and (delta.dtype != h.dtype or delta.shape != h.shape)):
        raise ValueError(f"bf16_rows.add_rms_norm: h [n, d] contiguous, delta like h, weight [d], one dtype "
                         f"(bf16 or float32), got h {tuple(h.shape)} {h.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, delta {None if delta is None else (tuple(delta.shape), delta.dtype)}")
    out = torch.empty_like(h)
    if delta is not None:
        delta = delta.contiguous()
    if _norm(h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(), n, d, eps,
             h.dtype == torch.float32, threads()) != 0:
        raise RuntimeError(f"bf16_rows.add_rms_norm: the kernel refused n {n}, d {d}")
    return out


def rotary_store(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """A bf16 decode step's rotary embedding and cache writes in one call: qkv [n, (heads + 2 kv_heads)
    * hd] (q/k/v's outputs side by side, rows may be strided), cos and sin [n, hd] (sin with
    rotate-half's sign folded in: cat(-sin1, sin2)), positions [n] int64; row i's keys (turned)
    and values go to cache row i at positions[i] (k_cache / v_cache one layer's [rows >= n, kv_heads,
    capacity, hd]); returns the turned queries [n, heads, hd], rounded as torch's mul and addcmul
    round."""
    n = qkv.shape[0]
    hd = k_cache.shape[3]
    if _rotary is None:
        raise RuntimeError("bf16_rows.rotary_store: the kernel is not loaded on this machine (see kernel())")
    tensors = (qkv, cos, sin, k_cache, v_cache)
    if any(t.dtype != torch.bfloat16 for t in tensors) or positions.dtype != torch.int64 \
            or qkv.shape[1] != (heads + 2 * kv_heads) * hd or qkv.stride(1) != 1 or cos.shape != (n, hd) \
            or sin.shape != (n, hd) or not (cos.is_contiguous() and sin.is_contiguous()) \
            or positions.shape != (n,) or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() \
            or k_cache.shape[0] < n or k_cache.shape[1] != kv_heads or k_cache.stride(3) != 1 \
            or k_cache.stride(2) != hd or hd % 32 or hd > 256:
        raise ValueError(f"bf16_rows.rotary_store: bf16 qkv [n, (heads + 2 kv_heads) * hd], cos / sin [n, hd], "
                         f"int64 positions [n], caches [rows, kv_heads, capacity, hd]; got qkv {tuple(qkv.shape)} "
                         f"{qkv.dtype}, cos {tuple(cos.shape)}, positions {tuple(positions.shape)} {positions.dtype}, "
                         f"cache {tuple(k_cache.shape)} {k_cache.dtype}")
    positions = positions.contiguous()
    q = torch.empty((n, heads, hd), dtype=torch.bfloat16)
    if _rotary(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), q.data_ptr(),
               k_cache.data_ptr(), v_cache.data_ptr(), n, heads, kv_heads, hd, k_cache.stride(0), k_cache.stride(1),
               k_cache.shape[2]) != 0:
        raise RuntimeError(f"bf16_rows.rotary_store: the kernel refused a position outside 0..{k_cache.shape[2] - 1}")
    return q
