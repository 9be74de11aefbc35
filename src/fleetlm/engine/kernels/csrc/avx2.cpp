// AVX2 kernels (AVX2, FMA, F16C): the same weight layouts as avx512.cpp, each 64-byte line read as two
// 32-byte halves of 8 rows. int8 dot products through vpmaddubsw (the sign trick keeps the int16 pair sums
// in range), bf16 widened to f32 by a 16-bit shift and multiplied with FMA.
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <type_traits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "avx2_lanes.h"

namespace fleet {
namespace {

inline __m256i broadcast4(const void* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* d, int32_t* sq,
                   float* sf) {
  const int64_t nb = kp / QBLOCK;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  alignas(32) float tail[QBLOCK];
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * QBLOCK, left = k - k0;
      const float* src = xr + k0;
      if (left < QBLOCK) {  // the last, partial block: zero-padded copy
        for (int64_t j = 0; j < QBLOCK; ++j) tail[j] = j < left ? src[j] : 0.0f;
        src = tail;
      }
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(src + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        vsum = _mm256_add_ps(vsum, v[j]);
      }
      const float scale = hmax(amax) / 127.0f;
      const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
      __m256i i[4];
      __m256i isum = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // round half to even, like torch.round
        isum = _mm256_add_epi32(isum, i[j]);
      }
      // packs interleave 128-bit lanes; the permute puts the 32 bytes back in column order
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
      const __m256i ordered = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + r * kp + k0), ordered);
      d[r * nb + b] = scale;
      sq[r * nb + b] = hsum_i32(isum);
      sf[r * nb + b] = hsum(vsum);
    }
  }
}

inline void store_half(const __m256* acc, int mr, const float* bias, float* y, int64_t n_total, int64_t r0,
                       int64_t n0) {
  const int64_t valid = n_total - n0;
  if (valid <= 0) return;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid < 8 ? valid : 8)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 b = bias ? _mm256_maskload_ps(bias + n0, mask) : _mm256_setzero_ps();
  for (int r = 0; r < mr; ++r) _mm256_maskstore_ps(y + (r0 + r) * n_total + n0, mask, _mm256_add_ps(acc[r], b));
}

// Σ u8 x s8 over 4-byte lanes into int32 when pair sums stay below 2^15 (4-bit weights: 2 * 15 * 127).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// One half (8 rows) of a tile, MR activation rows; `line` points at the half's first 32 bytes.
template <int MR>
void int4_half(const uint8_t* line, const uint16_t* st, int64_t group, const QuantizedRows& x, int64_t r0,
               __m256* acc) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int64_t nb = x.kp / QBLOCK, per_group = group / QBLOCK, groups = x.kp / group;
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + g * 32)));
    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + g * 32 + 16)));
    float xsum[MR] = {};
    for (int64_t bb = 0; bb < per_group; ++bb) {
      const int64_t b = g * per_group + bb;
      __m256i sum[MR];
      for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c, line += 64) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        const int64_t k = b * QBLOCK + c * 8;
        for (int r = 0; r < MR; ++r) {
          const int8_t* xq = x.q + (r0 + r) * x.kp + k;
          // lo and hi pair sums add in int16 without overflow (2 * 3810)
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(xq)),
                                                 _mm256_maddubs_epi16(hi, broadcast4(xq + 4)));
          sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        }
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[at])), acc[r]);
        xsum[r] += x.sf[at];
      }
    }
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xsum[r]), acc[r]);
  }
}

void int4_tiles(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantizedRows& x, int64_t m,
                const float* bias, float* y, int64_t n_total, int64_t t0, int64_t t1) {
  const int64_t groups = x.kp / group;
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* wt = w + t * x.kp * 8 + h * 32;
      const uint16_t* st = scales + t * groups * 32 + h * 8;
      const int64_t n0 = t * TILE_N + h * 8;
      __m256 acc[2];
      int64_t r = 0;
      for (; r + 2 <= m; r += 2) {
        int4_half<2>(wt, st, group, x, r, acc);
        store_half(acc, 2, bias, y, n_total, r, n0);
      }
      if (r < m) {
        int4_half<1>(wt, st, group, x, r, acc);
        store_half(acc, 1, bias, y, n_total, r, n0);
      }
    }
  }
}

template <int MR>
void int8_half(const uint8_t* line, const uint16_t* st, const QuantizedRows& x, int64_t r0, __m256* acc) {
  const int64_t nb = x.kp / QBLOCK;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * 16)));
    __m256i sum[MR];
    for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c, line += 64) {
      // stored q + 128 -> signed q; |q| x (x with q's sign) keeps vpmaddubsw's pair sums within int16
      const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line)), flip);
      const __m256i aq = _mm256_abs_epi8(q);
      const int64_t k = b * QBLOCK + c * 4;
      for (int r = 0; r < MR; ++r) {
        const __m256i xs = _mm256_sign_epi8(broadcast4(x.q + (r0 + r) * x.kp + k), q);
        sum[r] = _mm256_add_epi32(sum[r], dot_u8s8(aq, xs));
      }
    }
    for (int r = 0; r < MR; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[at])), acc[r]);
    }
  }
}

void int8_tiles(const uint8_t* w, const uint16_t* scales, const QuantizedRows& x, int64_t m, const float* bias,
                float* y, int64_t n_total, int64_t t0, int64_t t1) {
  const int64_t nb = x.kp / QBLOCK;
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* wt = w + t * x.kp * 16 + h * 32;
      const uint16_t* st = scales + t * nb * 16 + h * 8;
      const int64_t n0 = t * TILE_N + h * 8;
      __m256 acc[2];
      int64_t r = 0;
      for (; r + 2 <= m; r += 2) {
        int8_half<2>(wt, st, x, r, acc);
        store_half(acc, 2, bias, y, n_total, r, n0);
      }
      if (r < m) {
        int8_half<1>(wt, st, x, r, acc);
        store_half(acc, 1, bias, y, n_total, r, n0);
      }
    }
  }
}

template <int MR>
void bf16_half(const uint16_t* line, const float* x, int64_t kp, int64_t r0, __m256* acc) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 even[MR], odd[MR];
  for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kp; k += 2, line += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));  // column k: the low bf16 of each word
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));  // column k + 1
    for (int r = 0; r < MR; ++r) {
      const float* xr = x + (r0 + r) * kp + k;
      even[r] = _mm256_fmadd_ps(we, _mm256_broadcast_ss(xr), even[r]);
      odd[r] = _mm256_fmadd_ps(wo, _mm256_broadcast_ss(xr + 1), odd[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(even[r], odd[r]);
}

void bf16_tiles(const uint16_t* w, const void* xv, int64_t kp, int64_t m, const float* bias, float* y,
                int64_t n_total, int64_t t0, int64_t t1) {
  const float* x = static_cast<const float*>(xv);
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      const uint16_t* wt = w + t * kp * 16 + h * 16;
      const int64_t n0 = t * TILE_N + h * 8;
      __m256 acc[2];
      int64_t r = 0;
      for (; r + 2 <= m; r += 2) {
        bf16_half<2>(wt, x, kp, r, acc);
        store_half(acc, 2, bias, y, n_total, r, n0);
      }
      if (r < m) {
        bf16_half<1>(wt, x, kp, r, acc);
        store_half(acc, 1, bias, y, n_total, r, n0);
      }
    }
  }
}

// ---- several activation rows per weight pass (the verify step of speculative decoding, small batches).
// The single-row kernels above stream each half-tile once per pair of rows; these keep MR rows' sums in
// registers, unpack each weight line once per MR rows, and (int4) add the pair sums of a whole 32-column
// block in int16: 8 vpmaddubsw terms of at most 2 * 15 * 127 = 3810 stay below 2^15, so the widening
// vpmaddwd runs once per block instead of once per line.
constexpr int ROWS_MR = 4;

// Weight lines are fetched this many bytes ahead, as in avx512.cpp: a pass's first stream over a tile comes
// from memory, and a core waiting on one miss at a time does not fill the bus (4 rows of 17920x1536 int4 from
// memory, 2 threads: 2.7 -> 1.9-2.4 ms; later passes over the tile hit the cache and the prefetch is a no-op).
constexpr int PREFETCH = 2048;

// Integer adds are associative, so GCC turns an unrolled block's chain of sums into a tree that computes
// every product first and spills them to the stack (measured: no faster than the single-row kernel). An empty
// asm that "changes" the running sum pins it to a register after each line, in line order.
inline void keep_in_register(__m256i& v) { __asm__("" : "+x"(v)); }  // rows per pass: 2 * MR accumulators + the line's registers fit in 16 ymm

template <int MR>
void int4_rows_half(const uint8_t* line, const uint16_t* st, int64_t group, const QuantizedRows& x, int64_t r0,
                    __m256* acc) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t nb = x.kp / QBLOCK, per_group = group / QBLOCK, groups = x.kp / group;
  const int8_t* xq = x.q + r0 * x.kp;
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + g * 32)));
    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + g * 32 + 16)));
    float xsum[MR] = {};
    for (int64_t bb = 0; bb < per_group; ++bb) {
      const int64_t b = g * per_group + bb;
      __m256i sum[MR];
      for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c, line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH, _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        const int64_t k = b * QBLOCK + c * 8;
        for (int r = 0; r < MR; ++r) {
          const int8_t* p = xq + r * x.kp + k;
          sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(lo, broadcast4(p)));
          sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(hi, broadcast4(p + 4)));
          keep_in_register(sum[r]);
        }
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[r], ones));
        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(x.d[at])), acc[r]);
        xsum[r] += x.sf[at];
      }
    }
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xsum[r]), acc[r]);
  }
}

template <int MR>
void int8_rows_half(const uint8_t* line, const uint16_t* st, const QuantizedRows& x, int64_t r0, __m256* acc) {
  const int64_t nb = x.kp / QBLOCK;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int8_t* xq = x.q + r0 * x.kp;
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + b * 16)));
    __m256i sum[MR];
    for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c, line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH, _MM_HINT_T0);
      // |q| x (x with q's sign): pair sums up to 2 * 127 * 127 fit int16 once, not twice: widen every line
      const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line)), flip);
      const __m256i aq = _mm256_abs_epi8(q);
      const int64_t k = b * QBLOCK + c * 4;
      for (int r = 0; r < MR; ++r) {
        const __m256i xs = _mm256_sign_epi8(broadcast4(xq + r * x.kp + k), q);
        sum[r] = _mm256_add_epi32(sum[r], dot_u8s8(aq, xs));
        keep_in_register(sum[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[at])), acc[r]);
    }
  }
}

// bf16: even and odd columns in two chains per row, as bf16_half: a row's sums run in the same order in
// every pass (a verify step's rows equal single-row steps' to the bit); 4 rows give 8 chains, enough to
// cover the FMA latency.
constexpr int BF16_MR = 4;

template <int MR>
void bf16_rows_half(const uint16_t* line, const float* x, int64_t kp, int64_t r0, __m256* acc) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 even[MR], odd[MR];
  for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  const float* xr = x + r0 * kp;
  for (int64_t k = 0; k < kp; k += 2, line += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(line) + PREFETCH, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    for (int r = 0; r < MR; ++r) {
      even[r] = _mm256_fmadd_ps(we, _mm256_broadcast_ss(xr + r * kp + k), even[r]);
      odd[r] = _mm256_fmadd_ps(wo, _mm256_broadcast_ss(xr + r * kp + k + 1), odd[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(even[r], odd[r]);
}

// The last 1..N rows of a half-tile in one pass of exactly that many rows.
template <int N, typename F>
inline void rest_pass(int64_t left, int64_t r, F& pass) {
  if (left == N) {
    pass(std::integral_constant<int, N>{}, r);
  } else if constexpr (N > 1) {
    rest_pass<N - 1>(left, r, pass);
  }
}

// Rows [0, m) of one half-tile in passes of MR, then the rest in one narrower pass.
template <int MR, typename F>
inline void row_passes(int64_t m, F&& pass) {
  int64_t r = 0;
  for (; r + MR <= m; r += MR) pass(std::integral_constant<int, MR>{}, r);
  if (m > r) rest_pass<MR - 1>(m - r, r, pass);
}

void int4_rows(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantizedRows& x, int64_t m,
               const float* bias, float* y, int64_t n_total, int64_t t0, int64_t t1) {
  const int64_t groups = x.kp / group;
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* wt = w + t * x.kp * 8 + h * 32;
      const uint16_t* st = scales + t * groups * 32 + h * 8;
      const int64_t n0 = t * TILE_N + h * 8;
      row_passes<ROWS_MR>(m, [&](auto mr, int64_t r) {
        __m256 acc[decltype(mr)::value];
        int4_rows_half<decltype(mr)::value>(wt, st, group, x, r, acc);
        store_half(acc, decltype(mr)::value, bias, y, n_total, r, n0);
      });
    }
  }
}

void int8_rows(const uint8_t* w, const uint16_t* scales, const QuantizedRows& x, int64_t m, const float* bias,
               float* y, int64_t n_total, int64_t t0, int64_t t1) {
  const int64_t nb = x.kp / QBLOCK;
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* wt = w + t * x.kp * 16 + h * 32;
      const uint16_t* st = scales + t * nb * 16 + h * 8;
      const int64_t n0 = t * TILE_N + h * 8;
      row_passes<ROWS_MR>(m, [&](auto mr, int64_t r) {
        __m256 acc[decltype(mr)::value];
        int8_rows_half<decltype(mr)::value>(wt, st, x, r, acc);
        store_half(acc, decltype(mr)::value, bias, y, n_total, r, n0);
      });
    }
  }
}

void bf16_rows(const uint16_t* w, const void* xv, int64_t kp, int64_t m, const float* bias, float* y,
               int64_t n_total, int64_t t0, int64_t t1) {
  const float* x = static_cast<const float*>(xv);
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      const uint16_t* wt = w + t * kp * 16 + h * 16;
      const int64_t n0 = t * TILE_N + h * 8;
      row_passes<BF16_MR>(m, [&](auto mr, int64_t r) {
        __m256 acc[decltype(mr)::value];
        bf16_rows_half<decltype(mr)::value>(wt, x, kp, r, acc);
        store_half(acc, decltype(mr)::value, bias, y, n_total, r, n0);
      });
    }
  }
}

const IsaKernels table = {"avx2", quantize_rows, int4_tiles, int8_tiles, bf16_tiles, false,
                          int4_rows, int8_rows, bf16_rows};

}  // namespace

const IsaKernels* avx2_kernels() { return &table; }

}  // namespace fleet

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else

namespace fleet {
const IsaKernels* avx2_kernels() { return nullptr; }
}  // namespace fleet

#endif
