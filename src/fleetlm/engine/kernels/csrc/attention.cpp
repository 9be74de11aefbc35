// Decode attention over a float16 KV cache (AVX2, FMA, F16C): the query heads that share one KV head read
// each cached key and value row once, widened to f32 with F16C, for all of them. One call handles one chunk
// of slots and leaves a partial softmax (max, sum, unnormalized output) that ops.cpp merges across chunks
// (flash-decoding), so even one row and two KV heads keep both cores busy.
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <limits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "avx2_lanes.h"

namespace fleet {
namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline __m256 load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// e^x for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, 2^n through the exponent bits);
// relative error about 2e-7. Lanes at -inf give 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact first part
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(dead, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// scores[g][s - s0] = q[g] . k[s] for NG heads, two slots at a time: each key row is loaded and widened
// once for all NG heads, and 2 x NG independent sums keep the FMA units busy (one slot at a time, the
// chain of d / 8 dependent FMAs made this latency-bound: 1.7 ms for Qwen2.5-1.5B's layer at 8k).
template <int NG>
void score_rows(const float* q, int64_t d, const uint16_t* k, int64_t stride, const uint8_t* mask, int64_t s0,
                int64_t s1, float* scores, int64_t ld) {
  int64_t s = s0;
  for (; s + 2 <= s1; s += 2) {
    const uint16_t* r0 = k + s * stride;
    const uint16_t* r1 = r0 + stride;
    __m256 a0[NG], a1[NG];
    for (int g = 0; g < NG; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 k0 = load_f16(r0 + j), k1 = load_f16(r1 + j);
      for (int g = 0; g < NG; ++g) {
        const __m256 qv = _mm256_loadu_ps(q + g * d + j);
        a0[g] = _mm256_fmadd_ps(qv, k0, a0[g]);
        a1[g] = _mm256_fmadd_ps(qv, k1, a1[g]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      scores[g * ld + s - s0] = hsum(a0[g]);
      scores[g * ld + s + 1 - s0] = hsum(a1[g]);
    }
  }
  for (; s < s1; ++s) {
    const uint16_t* r0 = k + s * stride;
    __m256 a0[NG];
    for (int g = 0; g < NG; ++g) a0[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 k0 = load_f16(r0 + j);
      for (int g = 0; g < NG; ++g) a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + j), k0, a0[g]);
    }
    for (int g = 0; g < NG; ++g) scores[g * ld + s - s0] = hsum(a0[g]);
  }
  if (mask != nullptr) {
    for (s = s0; s < s1; ++s) {
      if (mask[s] == 0) {
        for (int g = 0; g < NG; ++g) scores[g * ld + s - s0] = NEG_INF;
      }
    }
  }
}

// out[g][j..j+8W) = sum over s of p[g][s - s0] * v[s][j..j+8W), the sums in registers across the chunk's
// slots (accumulating in memory made this store-bound), each value row's slice widened once for NG heads.
template <int NG, int W>
void accumulate_columns(const float* p, int64_t ld, const uint16_t* v, int64_t stride, int64_t s0, int64_t s1,
                        int64_t j, int64_t d, float* out) {
  __m256 a[NG][W];
  for (int g = 0; g < NG; ++g)
    for (int w = 0; w < W; ++w) a[g][w] = _mm256_setzero_ps();
  for (int64_t s = s0; s < s1; ++s) {
    const uint16_t* row = v + s * stride + j;
    __m256 vv[W];
    for (int w = 0; w < W; ++w) vv[w] = load_f16(row + 8 * w);
    for (int g = 0; g < NG; ++g) {
      const __m256 pg = _mm256_broadcast_ss(p + g * ld + s - s0);  // 0 for a masked slot
      for (int w = 0; w < W; ++w) a[g][w] = _mm256_fmadd_ps(pg, vv[w], a[g][w]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(out + g * d + j + 8 * w, a[g][w]);
}

// Heads two at a time over 32 columns (a whole 64-byte line of a row): 8 sums and 4 widened values in
// registers, each probability broadcast once per line.
template <int NG>
void accumulate_rows(const float* p, int64_t ld, int64_t d, const uint16_t* v, int64_t stride, int64_t s0,
                     int64_t s1, float* out) {
  for (int g = 0; g < NG; g += 2) {
    const float* pg = p + g * ld;
    float* og = out + g * d;
    int64_t j = 0;
    if (NG - g >= 2) {
      for (; j + 32 <= d; j += 32) accumulate_columns<2, 4>(pg, ld, v, stride, s0, s1, j, d, og);
      for (; j < d; j += 8) accumulate_columns<2, 1>(pg, ld, v, stride, s0, s1, j, d, og);
    } else {
      for (; j + 32 <= d; j += 32) accumulate_columns<1, 4>(pg, ld, v, stride, s0, s1, j, d, og);
      for (; j < d; j += 8) accumulate_columns<1, 1>(pg, ld, v, stride, s0, s1, j, d, og);
    }
  }
}

// Softmax numerators of one head's chunk in place: p = e^(s - max); returns the max, adds the sum to *sum.
float exp_chunk(float* s, int64_t n, float* sum) {
  float m = NEG_INF;
  for (int64_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  if (m == NEG_INF) {  // every slot masked: nothing here
    for (int64_t i = 0; i < n; ++i) s[i] = 0.0f;
    return m;
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum(acc);
  for (; i < n; ++i) {
    s[i] = s[i] == NEG_INF ? 0.0f : std::exp(s[i] - m);
    total += s[i];
  }
  *sum += total;
  return m;
}

template <int NG>
void heads_block(const float* q, int64_t d, const uint16_t* k, const uint16_t* v, int64_t k_stride,
                 int64_t v_stride, const uint8_t* mask, int64_t s0, int64_t s1, float* scores, float* acc,
                 float* m, float* l) {
  const int64_t n = s1 - s0;
  score_rows<NG>(q, d, k, k_stride, mask, s0, s1, scores, n);
  for (int g = 0; g < NG; ++g) {
    l[g] = 0.0f;
    m[g] = exp_chunk(scores + g * n, n, l + g);
  }
  accumulate_rows<NG>(scores, n, d, v, v_stride, s0, s1, acc);
}

void attend_f16_chunk(const float* q, int64_t g, int64_t d, const uint16_t* k, const uint16_t* v,
                      int64_t k_stride, int64_t v_stride, const uint8_t* mask, int64_t s0, int64_t s1,
                      float* scores, float* acc, float* m, float* l) {
  for (int64_t g0 = 0; g0 < g; g0 += 4) {  // 4 heads a pass: their accumulators stay in registers
    const int64_t nb = g - g0 < 4 ? g - g0 : 4;
    const float* qb = q + g0 * d;
    float *ab = acc + g0 * d, *mb = m + g0, *lb = l + g0;
    switch (nb) {
      case 4: heads_block<4>(qb, d, k, v, k_stride, v_stride, mask, s0, s1, scores, ab, mb, lb); break;
      case 3: heads_block<3>(qb, d, k, v, k_stride, v_stride, mask, s0, s1, scores, ab, mb, lb); break;
      case 2: heads_block<2>(qb, d, k, v, k_stride, v_stride, mask, s0, s1, scores, ab, mb, lb); break;
      default: heads_block<1>(qb, d, k, v, k_stride, v_stride, mask, s0, s1, scores, ab, mb, lb); break;
    }
  }
}

}  // namespace

AttendChunk avx2_attend_f16() { return &attend_f16_chunk; }

}  // namespace fleet

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else

namespace fleet {
AttendChunk avx2_attend_f16() { return nullptr; }
}  // namespace fleet

#endif
