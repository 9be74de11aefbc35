// Raw-pointer GEMM kernels shared by the ISA translation units and the PyTorch operators (ops.cpp).
//
// Every weight layout is a sequence of tiles of TILE_N = 16 output rows; inside a tile, one 64-byte line
// holds the next few input columns of all 16 rows, so a single aligned load feeds 16 output lanes:
//   int4: a line is 16 rows x 8 columns; byte 4*i + j of line c of tile t holds row 16t+i, column 8c+j in
//         its low nibble and column 8c+j+4 in its high nibble (values 0..15, w = q * d + m per group).
//   int8: a line is 16 rows x 4 columns; byte 4*i + j = row 16t+i, column 4c+j, stored as q + 128
//         (q in -127..127, w = q * d per block of 32 columns).
//   bf16: a line is 16 rows x 2 columns; 32-bit word i = (row 16t+i, column 2c) | (column 2c+1) << 16.
// Scales live in their own arrays, also tile-major: int4 [tiles][groups][2][16] fp16 (d then m),
// int8 [tiles][blocks][16] fp16. Activations are quantized per call to int8 in blocks of 32 columns
// (scale xd, integer sum xsq and float sum xsf per block), as llama.cpp's Q8_0 activations are.
// These headers and the ISA files include no PyTorch header, so code built for one ISA never leaks into
// inline functions shared with the rest of the process.
#pragma once
#include <cstdint>

namespace fleet {

constexpr int64_t TILE_N = 16;
constexpr int64_t QBLOCK = 32;

struct QuantizedRows {  // activations of M rows, K padded to kp (a multiple of QBLOCK)
  const int8_t* q;      // [M][kp]
  const float* d;       // [M][kp / 32] scale of each block
  const int32_t* sq;    // [M][kp / 32] sum of the block's int8 values
  const float* sf;      // [M][kp / 32] sum of the block's float values (before quantization)
  int64_t kp;
};

struct IsaKernels {
  const char* name;
  // x [M][k] float -> q (zero beyond k up to kp), d, sq, sf. Rows are independent.
  void (*quantize_rows)(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* d, int32_t* sq,
                        float* sf);
  // y[m][n] for n in the tiles [t0, t1); y is [M][n_total] float, bias may be null.
  void (*int4_tiles)(const uint8_t* w, const uint16_t* scales, int64_t group, const QuantizedRows& x,
                     int64_t m, const float* bias, float* y, int64_t n_total, int64_t t0, int64_t t1);
  void (*int8_tiles)(const uint8_t* w, const uint16_t* scales, const QuantizedRows& x, int64_t m,
                     const float* bias, float* y, int64_t n_total, int64_t t0, int64_t t1);
  // x: [M][kp] bf16 (as uint16) when bf16_wants_bf16 is set, else float; kp a multiple of 32.
  void (*bf16_tiles)(const uint16_t* w, const void* x, int64_t kp, int64_t m, const float* bias, float* y,
                     int64_t n_total, int64_t t0, int64_t t1);
  bool bf16_wants_bf16;
  // The same products with each weight line unpacked once per pass of several rows and prefetched ahead;
  // null where the ISA's *_tiles already do both (AVX-512: 4 rows a pass).
  decltype(int4_tiles) int4_rows;
  decltype(int8_tiles) int8_rows;
  decltype(bf16_tiles) bf16_rows;
};

// nullptr when the translation unit was built for another architecture.
const IsaKernels* avx512_kernels();
const IsaKernels* avx2_kernels();

// Decode attention (attention.cpp): the G query heads q [G][d] (scaled) that share one KV head, over slots
// [s0, s1) of float16 rows k + s * k_stride, v + s * v_stride (d a multiple of 8); mask [slots] (0 = skip) or
// null. Leaves the chunk's partial softmax: m[g] (max score, -inf when all masked), l[g] (sum of e^(s - m)),
// acc[g][d] (sum of e^(s - m) v). scores: scratch of 4 * (s1 - s0) floats.
using AttendChunk = void (*)(const float* q, int64_t g, int64_t d, const uint16_t* k, const uint16_t* v,
                             int64_t k_stride, int64_t v_stride, const uint8_t* mask, int64_t s0, int64_t s1,
                             float* scores, float* acc, float* m, float* l);
AttendChunk avx2_attend_f16();

}  // namespace fleet
