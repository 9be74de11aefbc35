// PyTorch operators over the ISA kernels: fleetlm_kernels::linear_int4 / linear_int8 / linear_bf16 and the
// activation quantizer, multithreaded over tiles of 16 output rows with at::parallel_for, with Meta
// implementations so torch.compile (Inductor, cpp_wrapper) calls them as extern kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace fleet {
namespace {

// 0: none (the Python side falls back to PyTorch), 1: AVX2, 2: AVX-512.
int best_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;  // F16C comes with both
#endif
  return 0;
}

int initial_level() {
  const int best = best_level();
  const char* forced = std::getenv("FLEET_KERNELS_ISA");  // "avx2" forces the AVX2 path on AVX-512 CPUs
  if (forced && std::strcmp(forced, "avx2") == 0 && best >= 1) return 1;
  return best;
}

std::atomic<int> level{initial_level()};

// Every M runs on the *_rows kernels where the ISA has them (AVX2: passes of several rows, and a single row
// with weight prefetching: 17920x1536 int4 from memory, 2 threads, 1.66 -> 1.05-1.27 ms). FLEET_KERNELS_ROWS=0
// (or set_rows_kernels(0)) keeps the kernels as they were before them for every M: bench/verify_cost.py's
// "before". Both give the same numbers to the bit.
bool initial_rows() {
  const char* v = std::getenv("FLEET_KERNELS_ROWS");
  return !(v && std::strcmp(v, "0") == 0);
}

std::atomic<bool> rows_on{initial_rows()};

// The kernel for any M: the rows one where the ISA has one and it is switched on.
template <typename F>
F pick(F single, F rows) {
  return rows != nullptr && rows_on.load(std::memory_order_relaxed) ? rows : single;
}

const IsaKernels& kernels() {
  const int l = level.load(std::memory_order_relaxed);
  const IsaKernels* k = l == 2 ? avx512_kernels() : l == 1 ? avx2_kernels() : nullptr;
  TORCH_CHECK(k != nullptr, "fleetlm_kernels: this CPU has neither AVX2+FMA nor AVX-512");
  return *k;
}

// Tiles per parallel task: at least ~32 KB of weights, so a small layer does not pay for thread wake-ups.
int64_t grain(int64_t tile_bytes) { return std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(tile_bytes, 1)); }

// The activations of one call, quantized: one scratch allocation (a tensor per part cost ~1 us each).
struct Quantized {
  at::Tensor buffer;  // [q: M*kp int8][d: M*nb float][sq: M*nb int32][sf: M*nb float]
  QuantizedRows rows;
};

Quantized quantize(const at::Tensor& x, int64_t kp) {
  TORCH_CHECK(x.dim() == 2, "fleetlm_kernels: x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(kp % QBLOCK == 0 && x.size(1) <= kp, "fleetlm_kernels: K=", x.size(1), " does not fit kp=", kp);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t m = xf.size(0), k = xf.size(1), nb = kp / QBLOCK;
  at::Tensor buffer = at::empty({m * kp + 3 * m * nb * 4}, xf.options().dtype(at::kChar));
  int8_t* q = buffer.data_ptr<int8_t>();
  float* d = reinterpret_cast<float*>(q + m * kp);  // kp is a multiple of 32: aligned for floats
  int32_t* sq = reinterpret_cast<int32_t*>(d + m * nb);
  float* sf = reinterpret_cast<float*>(sq + m * nb);
  const IsaKernels& isa = kernels();
  const float* src = xf.data_ptr<float>();
  if (m < 16) {
    isa.quantize_rows(src, m, k, kp, q, d, sq, sf);  // no parallel region for a decode step's few rows
  } else {
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      isa.quantize_rows(src + r0 * k, r1 - r0, k, kp, q + r0 * kp, d + r0 * nb, sq + r0 * nb, sf + r0 * nb);
    });
  }
  return {buffer, {q, d, sq, sf, kp}};
}

const float* bias_ptr(const std::optional<at::Tensor>& bias, at::Tensor& holder, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->numel() == n, "fleetlm_kernels: bias has ", bias->numel(), " values, expected ", n);
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

void check_weight(const at::Tensor& w, at::ScalarType dtype, int64_t n, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == dtype && w.is_contiguous(), op,
              ": packed weight must be a contiguous 2-D tensor of the packing's dtype");
  TORCH_CHECK(w.size(0) * TILE_N >= n && (w.size(0) - 1) * TILE_N < n, op, ": ", w.size(0),
              " tiles do not hold ", n, " output rows");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_rows_op(const at::Tensor& x, int64_t kp) {
  const Quantized q = quantize(x, kp);
  const int64_t m = x.size(0), nb = kp / QBLOCK;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor codes = at::empty({m, kp}, x.options().dtype(at::kChar)), d = at::empty({m, nb}, f32),
             sq = at::empty({m, nb}, x.options().dtype(at::kInt)), sf = at::empty({m, nb}, f32);
  std::memcpy(codes.data_ptr(), q.rows.q, m * kp);
  std::memcpy(d.data_ptr(), q.rows.d, m * nb * 4);
  std::memcpy(sq.data_ptr(), q.rows.sq, m * nb * 4);
  std::memcpy(sf.data_ptr(), q.rows.sf, m * nb * 4);
  return {codes, d, sq, sf};
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n, int64_t group) {
  check_weight(w, at::kByte, n, "linear_int4");
  const int64_t kp = w.size(1) / 8;
  TORCH_CHECK(group % QBLOCK == 0 && kp % group == 0, "linear_int4: group ", group, " does not divide K=", kp);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == w.size(0) * (kp / group) * 32,
              "linear_int4: scales must be contiguous float16 [tiles, K/group, 2, 16]");
  const Quantized q = quantize(x, kp);
  const QuantizedRows& rows = q.rows;
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat)), bias_f;
  const float* b = bias_ptr(bias, bias_f, n);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  const IsaKernels& isa = kernels();
  const auto run = pick(isa.int4_tiles, isa.int4_rows);
  at::parallel_for(0, w.size(0), grain(kp * 8), [&](int64_t t0, int64_t t1) {
    run(wp, sp, group, rows, m, b, yp, n, t0, t1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  check_weight(w, at::kByte, n, "linear_int8");
  const int64_t kp = w.size(1) / 16;
  TORCH_CHECK(kp % QBLOCK == 0, "linear_int8: K=", kp, " is not a multiple of ", QBLOCK);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == w.size(0) * (kp / QBLOCK) * 16,
              "linear_int8: scales must be contiguous float16 [tiles, K/32, 16]");
  const Quantized q = quantize(x, kp);
  const QuantizedRows& rows = q.rows;
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat)), bias_f;
  const float* b = bias_ptr(bias, bias_f, n);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  const IsaKernels& isa = kernels();
  const auto run = pick(isa.int8_tiles, isa.int8_rows);
  at::parallel_for(0, w.size(0), grain(kp * 16), [&](int64_t t0, int64_t t1) {
    run(wp, sp, rows, m, b, yp, n, t0, t1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       int64_t n) {
  check_weight(w, at::kBFloat16, n, "linear_bf16");
  TORCH_CHECK(x.dim() == 2, "linear_bf16: x must be 2-D [M, K]");
  const int64_t kp = w.size(1) / TILE_N, m = x.size(0), k = x.size(1);
  TORCH_CHECK(kp % QBLOCK == 0 && k <= kp, "linear_bf16: K=", k, " does not fit the packing's ", kp);
  const IsaKernels& isa = kernels();
  // The AVX-512 kernel multiplies bf16 pairs (vdpbf16ps); the AVX2 one widens weights and takes f32.
  at::Tensor xs = x.to(isa.bf16_wants_bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  if (k < kp) xs = at::constant_pad_nd(xs, {0, kp - k});
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat)), bias_f;
  const float* b = bias_ptr(bias, bias_f, n);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const void* xp = xs.data_ptr();
  float* yp = y.data_ptr<float>();
  const auto run = pick(isa.bf16_tiles, isa.bf16_rows);
  at::parallel_for(0, w.size(0), grain(kp * 32), [&](int64_t t0, int64_t t1) {
    run(wp, xp, kp, m, b, yp, n, t0, t1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// One query per row and head, q [B, H, D] float, over a float16 cache k, v [B, H_kv, L, D] (any strides but
// the last; the H / H_kv query heads of a group read their KV head's rows once); mask [B, L] bool (true =
// attend) or none. Work is split into chunks of ATTEND_CHUNK slots per (row, KV head), merged afterwards
// (flash-decoding): two KV heads and one row still keep both cores busy. Returns [B, H, D] float.
constexpr int64_t ATTEND_CHUNK = 256;

at::Tensor attend_f16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "attend_f16: q [B, H, D], k and v [B, H_kv, L, D]");
  TORCH_CHECK(k.scalar_type() == at::kHalf && v.scalar_type() == at::kHalf, "attend_f16: k and v must be float16");
  TORCH_CHECK(k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "attend_f16: k and v must have one shape and contiguous rows");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), h_kv = k.size(1), len = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && h % h_kv == 0 && d % 8 == 0,
              "attend_f16: shapes do not fit (head_dim must be a multiple of 8)");
  const AttendChunk chunk_fn = avx2_attend_f16();
  TORCH_CHECK(chunk_fn != nullptr && best_level() >= 1, "attend_f16: needs AVX2, FMA and F16C");
  const int64_t g = h / h_kv, chunks = std::max<int64_t>(1, (len + ATTEND_CHUNK - 1) / ATTEND_CHUNK);
  const at::Tensor qs = (q.to(at::kFloat) * scale).contiguous();
  at::Tensor mask_u8;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == b && mask->size(1) == len, "attend_f16: mask must be [B, L]");
    mask_u8 = mask->to(at::kByte).contiguous();
  }
  // partial results of each (row, KV head, chunk): acc [G][D], then m [G] and l [G]
  const int64_t part = g * d + 2 * g, tasks = b * h_kv * chunks;
  at::Tensor partial = at::empty({tasks, part}, qs.options());
  const float* qp = qs.data_ptr<float>();
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::Half>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::Half>());
  const uint8_t* mp = mask_u8.defined() ? mask_u8.data_ptr<uint8_t>() : nullptr;
  float* pp = partial.data_ptr<float>();
  // below ~2k slot-rows in all a parallel region costs more than it saves
  const int64_t grain_tasks = b * h_kv * len < 2048 ? tasks : 1;
  at::parallel_for(0, tasks, grain_tasks, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(4 * ATTEND_CHUNK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chunks, kvh = (t / chunks) % h_kv, row = t / (chunks * h_kv);
      const int64_t s0 = c * ATTEND_CHUNK, s1 = std::min(len, s0 + ATTEND_CHUNK);
      float* out = pp + t * part;
      chunk_fn(qp + (row * h + kvh * g) * d, g, d, kp + row * k.stride(0) + kvh * k.stride(1),
               vp + row * v.stride(0) + kvh * v.stride(1), k.stride(2), v.stride(2),
               mp == nullptr ? nullptr : mp + row * len, s0, s1, scores.data(), out, out + g * d,
               out + g * d + g);
    }
  });
  at::Tensor y = at::zeros({b, h, d}, qs.options());
  float* yp = y.data_ptr<float>();
  for (int64_t row = 0; row < b; ++row) {  // merge the chunks: rescale each to the overall max
    for (int64_t kvh = 0; kvh < h_kv; ++kvh) {
      const float* base = pp + (row * h_kv + kvh) * chunks * part;
      for (int64_t j = 0; j < g; ++j) {
        float top = -std::numeric_limits<float>::infinity(), total = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) top = std::max(top, base[c * part + g * d + j]);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // every slot masked: zeros
        float* o = yp + (row * h + kvh * g + j) * d;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pc = base + c * part;
          const float mc = pc[g * d + j];
          if (mc == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(mc - top);
          total += w * pc[g * d + g + j];
          for (int64_t i = 0; i < d; ++i) o[i] += w * pc[j * d + i];
        }
        for (int64_t i = 0; i < d; ++i) o[i] /= total;
      }
    }
  }
  return y;
}

// Meta: shapes and dtypes only, for FakeTensor tracing under torch.compile.
at::Tensor linear_meta(const at::Tensor& x, int64_t n) { return at::empty({x.size(0), n}, x.options()); }
at::Tensor linear_int4_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t n, int64_t) { return linear_meta(x, n); }
at::Tensor linear_int8_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t n) { return linear_meta(x, n); }
at::Tensor linear_bf16_meta(const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t n) { return linear_meta(x, n); }

int64_t isa_level() { return level.load(); }
int64_t best_isa_level() { return best_level(); }

int64_t rows_kernels() { return rows_on.load() ? 1 : 0; }

int64_t set_rows_kernels(int64_t on) {  // returns the setting before
  return rows_on.exchange(on != 0) ? 1 : 0;
}

int64_t set_isa_level(int64_t wanted) {  // clamps to what the CPU has; returns the level now in use
  const int64_t l = std::max<int64_t>(0, std::min<int64_t>(wanted, best_level()));
  level.store(static_cast<int>(l));
  return l;
}

}  // namespace
}  // namespace fleet

TORCH_LIBRARY(fleetlm_kernels, m) {
  m.def("quantize_rows(Tensor x, int kp) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_int4(Tensor x, Tensor weight, Tensor scales, Tensor? bias, int out_features, int group) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor weight, Tensor scales, Tensor? bias, int out_features) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias, int out_features) -> Tensor");
  m.def("attend_f16(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("isa_level() -> int", &fleet::isa_level);
  m.def("best_isa_level() -> int", &fleet::best_isa_level);
  m.def("set_isa_level(int level) -> int", &fleet::set_isa_level);
  m.def("rows_kernels() -> int", &fleet::rows_kernels);
  m.def("set_rows_kernels(int on) -> int", &fleet::set_rows_kernels);
}

TORCH_LIBRARY_IMPL(fleetlm_kernels, CPU, m) {
  m.impl("quantize_rows", &fleet::quantize_rows_op);
  m.impl("linear_int4", &fleet::linear_int4);
  m.impl("linear_int8", &fleet::linear_int8);
  m.impl("linear_bf16", &fleet::linear_bf16);
  m.impl("attend_f16", &fleet::attend_f16);
}

TORCH_LIBRARY_IMPL(fleetlm_kernels, Meta, m) {
  m.impl("linear_int4", &fleet::linear_int4_meta);
  m.impl("linear_int8", &fleet::linear_int8_meta);
  m.impl("linear_bf16", &fleet::linear_bf16_meta);
}
