// AVX-512 kernels (F, BW, VL, VNNI, BF16): vpdpbusd for int4 and int8 weights, vdpbf16ps for bf16.
// Built with per-function target options, so one build serves CPUs without AVX-512 (never called there).
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c")
#endif

namespace fleet {
namespace {

// Weight lines are fetched this many bytes ahead: the streams are long and sequential, and a core that
// waits on one miss at a time cannot fill the memory bus on its own.
constexpr int PREFETCH = 2048;

inline __m512i broadcast4(const void* p) {  // 4 bytes (int8 x4 or bf16 x2) to every 32-bit lane
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __mmask16 lanes(int64_t valid) {
  return valid >= 16 ? (__mmask16)0xFFFF : valid <= 0 ? (__mmask16)0 : (__mmask16)((1u << valid) - 1);
}

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* d, int32_t* sq,
                   float* sf) {
  const int64_t nb = kp / QBLOCK;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * QBLOCK, left = k - k0;
      const __m512 v0 = _mm512_maskz_loadu_ps(lanes(left), xr + k0);
      const __m512 v1 = _mm512_maskz_loadu_ps(lanes(left - 16), xr + k0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float scale = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round half to even, like torch.round
      const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
      int8_t* qb = q + r * kp + k0;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
      d[r * nb + b] = scale;
      sq[r * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
      sf[r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    }
  }
}

inline void store_rows(const __m512* acc, int mr, const float* bias, float* y, int64_t n_total, int64_t r0,
                       int64_t n0) {
  const __mmask16 mask = lanes(n_total - n0);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < mr; ++r) _mm512_mask_storeu_ps(y + (r0 + r) * n_total + n0, mask, _mm512_add_ps(acc[r], b));
}

// MR activation rows against one tile of 16 weight rows: each weight line is loaded once for all MR rows.
template <int MR>
void int4_tile(const uint8_t* line, const uint16_t* st, int64_t group, const QuantizedRows& x, int64_t r0,
               __m512* acc) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t nb = x.kp / QBLOCK, per_group = group / QBLOCK, groups = x.kp / group;
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + g * 32)));
    const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + g * 32 + 16)));
    float xsum[MR] = {};
    for (int64_t bb = 0; bb < per_group; ++bb) {
      const int64_t b = g * per_group + bb;
      __m512i lo_sum[MR], hi_sum[MR];  // two chains: vpdpbusd's latency, not its throughput, bounds M = 1
      for (int r = 0; r < MR; ++r) lo_sum[r] = hi_sum[r] = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c, line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(line);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const int64_t k = b * QBLOCK + c * 8;
        for (int r = 0; r < MR; ++r) {
          const int8_t* xq = x.q + (r0 + r) * x.kp + k;
          lo_sum[r] = _mm512_dpbusd_epi32(lo_sum[r], lo, broadcast4(xq));
          hi_sum[r] = _mm512_dpbusd_epi32(hi_sum[r], hi, broadcast4(xq + 4));
        }
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum[r], hi_sum[r]));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(x.d[at])), acc[r]);
        xsum[r] += x.sf[at];
      }
    }
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xsum[r]), acc[r]);
  }
}

void int4_tiles(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantizedRows& x, int64_t m,
                const float* bias, float* y, int64_t n_total, int64_t t0, int64_t t1) {
  const int64_t groups = x.kp / group;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * x.kp * 8;
    const uint16_t* st = scales + t * groups * 32;
    __m512 acc[4];
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      int4_tile<4>(wt, st, group, x, r, acc);
      store_rows(acc, 4, bias, y, n_total, r, t * TILE_N);
    }
    const int rest = static_cast<int>(m - r);
    if (rest == 3) int4_tile<3>(wt, st, group, x, r, acc);
    if (rest == 2) int4_tile<2>(wt, st, group, x, r, acc);
    if (rest == 1) int4_tile<1>(wt, st, group, x, r, acc);
    if (rest) store_rows(acc, rest, bias, y, n_total, r, t * TILE_N);
  }
}

template <int MR>
void int8_tile(const uint8_t* line, const uint16_t* st, const QuantizedRows& x, int64_t r0, __m512* acc) {
  const int64_t nb = x.kp / QBLOCK;
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + b * 16)));
    __m512i even[MR], odd[MR];
    for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm512_setzero_si512();
    for (int c = 0; c < 8; c += 2, line += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH + 64, _MM_HINT_T0);
      const __m512i v0 = _mm512_loadu_si512(line), v1 = _mm512_loadu_si512(line + 64);
      const int64_t k = b * QBLOCK + c * 4;
      for (int r = 0; r < MR; ++r) {
        const int8_t* xq = x.q + (r0 + r) * x.kp + k;
        even[r] = _mm512_dpbusd_epi32(even[r], v0, broadcast4(xq));
        odd[r] = _mm512_dpbusd_epi32(odd[r], v1, broadcast4(xq + 4));
      }
    }
    for (int r = 0; r < MR; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      // weights are stored as q + 128: subtract 128 * (sum of the block's activations)
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(even[r], odd[r]), _mm512_set1_epi32(128 * x.sq[at]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(x.d[at])), acc[r]);
    }
  }
}

void int8_tiles(const uint8_t* w, const uint16_t* scales, const QuantizedRows& x, int64_t m, const float* bias,
                float* y, int64_t n_total, int64_t t0, int64_t t1) {
  const int64_t nb = x.kp / QBLOCK;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * x.kp * 16;
    const uint16_t* st = scales + t * nb * 16;
    __m512 acc[4];
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      int8_tile<4>(wt, st, x, r, acc);
      store_rows(acc, 4, bias, y, n_total, r, t * TILE_N);
    }
    const int rest = static_cast<int>(m - r);
    if (rest == 3) int8_tile<3>(wt, st, x, r, acc);
    if (rest == 2) int8_tile<2>(wt, st, x, r, acc);
    if (rest == 1) int8_tile<1>(wt, st, x, r, acc);
    if (rest) store_rows(acc, rest, bias, y, n_total, r, t * TILE_N);
  }
}

template <int MR>
void bf16_tile(const uint16_t* line, const uint16_t* x, int64_t kp, int64_t r0, __m512* acc) {
  __m512 even[MR], odd[MR];
  for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; k += 4, line += 64) {  // two lines (2 columns each); kp is a multiple of 32
    _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH + 64, _MM_HINT_T0);
    const __m512i v0 = _mm512_loadu_si512(line), v1 = _mm512_loadu_si512(line + 32);
    for (int r = 0; r < MR; ++r) {
      const uint16_t* xr = x + (r0 + r) * kp + k;
      even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)v0, (__m512bh)broadcast4(xr));
      odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)v1, (__m512bh)broadcast4(xr + 2));
    }
  }
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_add_ps(even[r], odd[r]);
}

void bf16_tiles(const uint16_t* w, const void* xv, int64_t kp, int64_t m, const float* bias, float* y,
                int64_t n_total, int64_t t0, int64_t t1) {
  const uint16_t* x = static_cast<const uint16_t*>(xv);
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* wt = w + t * kp * 16;
    __m512 acc[4];
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      bf16_tile<4>(wt, x, kp, r, acc);
      store_rows(acc, 4, bias, y, n_total, r, t * TILE_N);
    }
    const int rest = static_cast<int>(m - r);
    if (rest == 3) bf16_tile<3>(wt, x, kp, r, acc);
    if (rest == 2) bf16_tile<2>(wt, x, kp, r, acc);
    if (rest == 1) bf16_tile<1>(wt, x, kp, r, acc);
    if (rest) store_rows(acc, rest, bias, y, n_total, r, t * TILE_N);
  }
}

const IsaKernels table = {"avx512", quantize_rows, int4_tiles, int8_tiles, bf16_tiles, true, nullptr, nullptr,
                          nullptr};

}  // namespace

const IsaKernels* avx512_kernels() { return &table; }

}  // namespace fleet

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: no AVX-512 kernels in this build

namespace fleet {
const IsaKernels* avx512_kernels() { return nullptr; }
}  // namespace fleet

#endif
