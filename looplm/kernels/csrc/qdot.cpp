// Integer dot-product kernels for quantized decode (1-8 activation rows), and the int4
// dequantizer for prefill.
//
// Decode streams every weight once per token. Widening int8/int4 weights to fp32 before an
// FMA costs more instructions than the memory it saves, so these kernels quantize the
// activations instead and multiply integers:
//
//   activations: each bf16 row, once per call, in blocks of 32: xs_b = max|x| / 127,
//                xq = round(x / xs_b) in [-127, 127] (round half to even); padded with zero
//                blocks up to a multiple of 128 columns.
//   int8 weight: w = q * ws[n], q in [-127, 127]      y = ws[n] * sum_b xs_b * dot_b(q, xq)
//   int4 weight: w = q * s[n,g] + m[n,g], q in 0..15  y = sum_g s[n,g] * sum_{b in g} xs_b * dot_b(q, xq)
//                                                        + sum_g m[n,g] * sum_{b in g} xs_b * sum(xq in b)
//
// dot_b, the exact integer dot product of one 32-column block, comes from vpdpbusd (AVX-512
// VNNI: u8 x s8, four products summed into each int32 lane) or from vpmaddubsw + vpmaddwd
// (AVX2). Each block's int32 sums are converted to fp32 and multiplied by the block's scale.
// Dispatch at run time: VNNI where the CPU has AVX-512 VNNI/BW/VL (unless looplm_force_avx2,
// set from LOOPLM_CPU_ISA=avx2), else AVX2; output channels are split with at::parallel_for.
//
// int4 tiled layout (made at load time by looplm.quant.kernels.pack_int4_looplm): output rows
// in tiles of 16 (the last tile padded with zero rows), columns padded with q = 0 to Kp, a
// multiple of 128. A tile is Kp * 8 contiguous bytes: per 8 columns 8j..8j+7, 64 bytes, 4 per
// row r of the tile, byte 4r + i holding column 8j + i in its low nibble and 8j + 4 + i in its
// high nibble. So one 64-byte load is 16 rows x 4 columns per nibble: exactly vpdpbusd's
// shape, with the row's 4 activation bytes broadcast, and its 16 int32 lanes are the tile's 16
// output rows. No horizontal sums, the activations stay in column order, and the scale work
// (one conversion and one FMA per 32 columns) covers 16 rows at once. Measured on a 2-core
// Zen 4 VM against the earlier row-major layout (one row per pass, 4 blocks per 64 bytes):
// 1.8-2.7x on cache-resident weights (1 thread), 1.4-1.6x streaming from memory on 1 thread
// but 1.1-1.2x on 2, and 1.09x [0.93-1.15] over one pass of Ouro-1.4B's 168 projections
// (9 interleaved rounds; docs/benchmarks.md, session 6). Scales and mins are fp16
// [tiles, groups * 16], the tile's 16 rows side by side per group (half the bytes of fp32:
// 4.25 instead of 4.5 bits per weight at g = 128); the padding has scale and min 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "stream.h"


extern bool looplm_force_avx2;  // gemv.cpp

// int8 VNNI kernel, weight rows per pass for 3-8 activation rows: 0 = automatic, 1-4 forces it
// (tests, benchmarks). Automatic: 3 from 6 rows. Batched int8 decode of the 1.4B shape on a
// 2-vCPU Zen 4, against one weight row per pass (alternating in one process, paired): 3 per
// pass gave 0.76x at 3 rows, 0.94x at 5, 1.12x at 6, 1.09x at 7, 1.13x at 8. Unlike bf16's, this
// kernel converts and scales every 64-byte product, so it stays compute-bound either way.
int64_t looplm_int8_rows_per_pass = 0;

void set_int8_rows_per_pass(int64_t value) {
  TORCH_CHECK(value >= 0 && value <= 4, "set_int8_rows_per_pass: 0 (automatic) to 4");
  looplm_int8_rows_per_pass = value;
}

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kBlock = 32;   // activation quantization block
constexpr int64_t kChunk = 128;  // padded width unit
constexpr int64_t kTile = 16;    // int4: output rows per tile

bool use_vnni() {
  if (looplm_force_avx2) return false;
  static const bool value = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return value;
}

bool has_avx2() {
  static const bool value =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return value;
}

int64_t padded(int64_t k) { return (k + kChunk - 1) / kChunk * kChunk; }

// ---- activation quantization -------------------------------------------------------------

// Per-call activation buffers, reused: a decode step makes hundreds of these calls, and
// allocating tensors for them costs about as much as quantizing. Filled by the calling
// thread, read by the at::parallel_for workers while it waits.
struct QuantRows {
  int64_t kp = 0, blocks = 0;
  std::vector<int8_t> q;       // [M, Kp]
  std::vector<float> scale;    // [M, Kp/32], xs_b (0 for all-zero and padding blocks)
  std::vector<int32_t> sum;    // [M, Kp/32], sum of xq over the block
  std::vector<float> lanes;    // [M, Kp/4]: xs_b repeated over the 8 int32 lanes of its block (VNNI layout)
  std::vector<float> group;    // int4: [M, groups], sum over the group's blocks of xs_b * sum(xq)
  std::vector<float> y;        // [M, N] fp32 result before the bf16 rounding
};

thread_local QuantRows scratch;

__attribute__((target("avx2,fma"))) inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax_ps(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One full block of 32 bf16 values. _mm256_cvtps_epi32 rounds half to even (default MXCSR).
__attribute__((target("avx2,fma"))) void quantize_block(const uint16_t* x, int8_t* q, float* scale, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load_bf16x8(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
  }
  const float m = hmax_ps(amax);
  const float inv = m > 0.f ? 127.f / m : 0.f;
  *scale = m / 127.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i iv[4];
  for (int i = 0; i < 4; ++i) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
  *sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3])));
  // packs interleave 128-bit lanes; the permute puts the 32 bytes back in column order
  __m256i ab = _mm256_packs_epi32(iv[0], iv[1]), cd = _mm256_packs_epi32(iv[2], iv[3]);
  __m256i bytes = _mm256_packs_epi16(ab, cd);
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
}

QuantRows& quantize_rows(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), kp = padded(k), blocks = kp / kBlock;
  QuantRows& out = scratch;
  out.kp = kp;
  out.blocks = blocks;
  out.q.assign(m * kp, 0);
  out.scale.assign(m * blocks, 0.f);
  out.sum.assign(m * blocks, 0);
  out.lanes.resize(m * kp / 4);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  int8_t* qp = out.q.data();
  float* sp = out.scale.data();
  int32_t* up = out.sum.data();
  float* lp = out.lanes.data();
  uint16_t tail[kBlock];
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b * kBlock < k; ++b) {
      const int64_t start = b * kBlock, n = std::min<int64_t>(kBlock, k - start);
      const uint16_t* src = xp + r * k + start;
      if (n < kBlock) {  // a partial last block: zero-padded copy
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, src, n * sizeof(uint16_t));
        src = tail;
      }
      quantize_block(src, qp + r * kp + start, sp + r * blocks + b, up + r * blocks + b);
      if (n < kBlock) std::memset(qp + r * kp + start + n, 0, kBlock - n);
    }
    for (int64_t b = 0; b < blocks; ++b)
      for (int l = 0; l < 8; ++l) lp[r * (kp / 4) + b * 8 + l] = sp[r * blocks + b];
  }
  return out;
}

// ---- int8 ---------------------------------------------------------------------------------

// dpbusd wants one unsigned operand. The weights are made unsigned by flipping their sign bit
// (q ^ 0x80 = q + 128 as u8, one XOR per 64 weights shared by every row), so
//   dpbusd(q + 128, xq) = dot(q, xq) + 128 * sum(xq).
// The second term does not depend on the output channel: sum_b xs_b * 128 * sum_b(xq) is
// subtracted once per row at the end. No saturation: dpbusd accumulates exactly in int32.
template <int Rows>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_vnni(const int8_t* xq, const float* lanes,
                                                                      const float* correction, const int8_t* w,
                                                                      const float* wscale, float* y, int64_t n_begin,
                                                                      int64_t n_end, int64_t k, int64_t kp, int64_t n) {
  constexpr int U = Rows <= 2 ? 2 : 1;  // independent accumulator chains per row
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = k / 64;
  const int64_t rem = k % 64;
  const __mmask64 rem_mask = rem ? (~0ULL >> (64 - rem)) : 0;
  for (int64_t o = n_begin; o < n_end; ++o) {
    const int8_t* row = w + o * k;
    __m512 acc[Rows][U];
    for (int r = 0; r < Rows; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + U <= full; c += U) {
      for (int u = 0; u < U; ++u) {
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(row + 64 * (c + u)), flip);
        for (int r = 0; r < Rows; ++r) {
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xq + r * kp + 64 * (c + u)));
          acc[r][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(lanes + r * (kp / 4) + 16 * (c + u)), acc[r][u]);
        }
      }
    }
    for (; c < full + (rem ? 1 : 0); ++c) {  // the last whole chunk when U = 2, then a partial one
      const __m512i raw = c < full ? _mm512_loadu_si512(row + 64 * c) : _mm512_maskz_loadu_epi8(rem_mask, row + 64 * c);
      const __m512i wu = _mm512_xor_si512(raw, flip);  // padding becomes 128, multiplied by xq = 0
      for (int r = 0; r < Rows; ++r) {
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xq + r * kp + 64 * c));
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(lanes + r * (kp / 4) + 16 * c), acc[r][0]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      __m512 total = acc[r][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[r][u]);
      y[r * n + o] = (_mm512_reduce_add_ps(total) - correction[r]) * wscale[o];
    }
  }
}

// Several activation rows: Outs weight rows per pass, so each activation chunk (its int8 values
// and its scales) is loaded once for Outs dot products. With one weight row per pass, 8 rows'
// activations and lane scales of a 2048-wide input (32 KiB) leave L1 beside the weight stream
// and their loads set the pace (8 rows decoded 4x slower than 1 on the 1.4B shape). Per output
// the sum runs in the same order as int8_vnni's one-accumulator path (Rows > 2), so the
// results are the same bits.
template <int Rows, int Outs>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_vnni_outs(const int8_t* xq, const float* lanes,
                                                                           const float* correction, const int8_t* w,
                                                                           const float* wscale, float* y,
                                                                           int64_t n_begin, int64_t n_end, int64_t k,
                                                                           int64_t kp, int64_t n) {
  static_assert(Rows > 2, "rows 1-2 use int8_vnni's two accumulator chains");
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = k / 64, chunks = (k + 63) / 64;
  const int64_t rem = k % 64;
  const __mmask64 rem_mask = rem ? (~0ULL >> (64 - rem)) : 0;
  int64_t o = n_begin;
  for (; o + Outs <= n_end; o += Outs) {
    __m512 acc[Outs][Rows];
    for (int j = 0; j < Outs; ++j)
      for (int r = 0; r < Rows; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i wv[Outs];
      for (int j = 0; j < Outs; ++j) {
        const int8_t* src = w + (o + j) * k + 64 * c;
        const __m512i raw = c < full ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(rem_mask, src);
        wv[j] = _mm512_xor_si512(raw, flip);  // padding becomes 128, multiplied by xq = 0
      }
      for (int r = 0; r < Rows; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + r * kp + 64 * c);
        const __m512 lv = _mm512_loadu_ps(lanes + r * (kp / 4) + 16 * c);
        for (int j = 0; j < Outs; ++j) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv);
          acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), lv, acc[j][r]);
        }
      }
    }
    for (int j = 0; j < Outs; ++j)
      for (int r = 0; r < Rows; ++r) y[r * n + o + j] = (_mm512_reduce_add_ps(acc[j][r]) - correction[r]) * wscale[o + j];
  }
  if (o < n_end) int8_vnni<Rows>(xq, lanes, correction, w, wscale, y, o, n_end, k, kp, n);  // the rows left over
}

// int8_vnni_outs with the weight rows per pass that looplm_int8_rows_per_pass asks for (0:
// 3 from 6 activation rows), else int8_vnni.
template <int Rows>
void int8_vnni_passes(const int8_t* xq, const float* lanes, const float* correction, const int8_t* w,
                      const float* wscale, float* y, int64_t n_begin, int64_t n_end, int64_t k, int64_t kp, int64_t n) {
  if constexpr (Rows > 2) {
    const int64_t outs = looplm_int8_rows_per_pass ? looplm_int8_rows_per_pass : Rows >= 6 ? 3 : 1;
    switch (outs) {
      case 2: return int8_vnni_outs<Rows, 2>(xq, lanes, correction, w, wscale, y, n_begin, n_end, k, kp, n);
      case 3: return int8_vnni_outs<Rows, 3>(xq, lanes, correction, w, wscale, y, n_begin, n_end, k, kp, n);
      case 4: return int8_vnni_outs<Rows, 4>(xq, lanes, correction, w, wscale, y, n_begin, n_end, k, kp, n);
      default: break;
    }
  }
  int8_vnni<Rows>(xq, lanes, correction, w, wscale, y, n_begin, n_end, k, kp, n);
}

__attribute__((target("avx2,fma"))) inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// AVX2: vpmaddubsw needs an unsigned operand too, and saturates its int16 pair sums. With
// |w| as the unsigned side and xq carrying w's sign (vpsignb), every pair sum is at most
// 2 * 127 * 127 < 32767, so nothing saturates.
template <int Rows>
__attribute__((target("avx2,fma"), always_inline)) inline void int8_block_avx2(const int8_t* xq, const float* scale,
                                                                             const int8_t* src, int64_t b, int64_t kp,
                                                                             __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i wabs = _mm256_abs_epi8(wv);
  for (int r = 0; r < Rows; ++r) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * kp + b * kBlock));
    const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
    const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
    acc[r] = _mm256_fmadd_ps(d, _mm256_broadcast_ss(scale + r * (kp / kBlock) + b), acc[r]);
  }
}

template <int Rows>
__attribute__((target("avx2,fma"))) void int8_avx2(const int8_t* xq, const float* scale, const int8_t* w,
                                                   const float* wscale, float* y, int64_t n_begin, int64_t n_end,
                                                   int64_t k, int64_t kp, int64_t n) {
  constexpr int U = Rows <= 2 ? 2 : 1;  // accumulator sets, unrolled by hand (see int4_vnni)
  const int64_t blocks = (k + kBlock - 1) / kBlock, full = k / kBlock;
  alignas(32) int8_t tail[kBlock];
  const int64_t ahead = looplm::prefetch_bytes;
  for (int64_t o = n_begin; o < n_end; ++o) {
    const int8_t* row = w + o * k;
    __m256 acc[U][Rows];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < Rows; ++r) acc[u][r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + U <= full; b += U) {
      if (U == 2 || (b & 1) == 0) looplm::prefetch_ahead(row + b * kBlock, ahead);  // once per 64 bytes
      for (int u = 0; u < U; ++u) int8_block_avx2<Rows>(xq, scale, row + (b + u) * kBlock, b + u, kp, acc[u]);
    }
    for (; b < blocks; ++b) {  // the last whole block when U = 2, then a partial one
      const int8_t* src = row + b * kBlock;
      if (b >= full) {
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, src, k - b * kBlock);
        src = tail;
      }
      int8_block_avx2<Rows>(xq, scale, src, b, kp, acc[0]);
    }
    for (int r = 0; r < Rows; ++r) {
      __m256 total = acc[0][r];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][r]);
      y[r * n + o] = hsum_ps(total) * wscale[o];
    }
  }
}

// ---- int4 ---------------------------------------------------------------------------------

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc += dpbusd(w, the 4 bytes at x broadcast to every lane), with the broadcast folded into
// the instruction's memory operand ({1to16}). GCC emits a separate vpbroadcastd for
// _mm512_set1_epi32 here, two extra instructions per 64 weight bytes in the int4 kernel.
// Folding them measured 1.015-1.028x over a 1.4B projection pass (three A/B runs, 15 rounds).
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline __m512i dpbusd_broadcast(__m512i acc, __m512i w,
                                                                                           const int8_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// One tile (16 output rows) per pass. Per 8 columns: one 64-byte load, two ANDs, and per
// activation row two dpbusd with the row's 4 activation bytes broadcast. The low nibbles are
// q; the high nibbles are left in place (16 q, at most 240 as u8): their int32 sums are exact
// multiples of 16, so one arithmetic shift per block undoes it instead of a shift per load.
// Per block of 32 columns, the 16 rows' int32 sums are converted and scaled by s[n, g] * xs_b.
template <int Rows, int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void int4_vnni(
    const int8_t* xq, const float* xs, const float* xgroup, const uint8_t* w, const uint16_t* scales,
    const uint16_t* mins, float* y, int64_t t_begin, int64_t t_end, int64_t kp, int64_t n) {
  const int64_t groups = kp / G, blocks = kp / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* tile = w + t * kp * 8;
    const uint16_t* s = scales + t * groups * kTile;
    __m512 acc[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kTile * g)));
      for (int64_t b = g * (G / kBlock); b < (g + 1) * (G / kBlock); ++b) {
        __m512i lo_sum[Rows], hi_sum[Rows];
        for (int r = 0; r < Rows; ++r) lo_sum[r] = hi_sum[r] = _mm512_setzero_si512();
        const uint8_t* src = tile + b * (kBlock * 8);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(src + 64 * j);
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(v, high4);
          for (int r = 0; r < Rows; ++r) {
            const int8_t* xr = xq + r * kp + b * kBlock + 8 * j;
            lo_sum[r] = dpbusd_broadcast(lo_sum[r], lo, xr);
            hi_sum[r] = dpbusd_broadcast(hi_sum[r], hi, xr + 4);
          }
        }
        for (int r = 0; r < Rows; ++r) {
          const __m512i d = _mm512_add_epi32(lo_sum[r], _mm512_srai_epi32(hi_sum[r], 4));
          const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(xs[r * blocks + b]));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r]);
        }
      }
    }
    // the min term: sum_g m[n, g] * (sum over the group's blocks of xs_b * sum(xq))
    const uint16_t* m = mins + t * groups * kTile;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + kTile * g)));
      for (int r = 0; r < Rows; ++r) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xgroup[r * groups + g]), acc[r]);
    }
    const int64_t valid = std::min<int64_t>(kTile, n - kTile * t);  // the last tile may hold padding rows
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
    for (int r = 0; r < Rows; ++r) _mm512_mask_storeu_ps(y + r * n + kTile * t, keep, acc[r]);
  }
}

// AVX2, the same layout: each 64-byte load is two halves of 8 rows. vpmaddubsw(q, xq) with
// q <= 15 unsigned: pair sums are at most 2 * 15 * 127, and a lane's low- and high-nibble
// products add up to at most 4 * 15 * 127, so nothing saturates in int16 (which is why the
// high nibbles are shifted down here, unlike the VNNI kernel).
template <int Rows, int G>
__attribute__((target("avx2,fma,f16c"))) void int4_avx2(const int8_t* xq, const float* xs, const float* xgroup,
                                                        const uint8_t* w, const uint16_t* scales, const uint16_t* mins,
                                                        float* y, int64_t t_begin, int64_t t_end, int64_t kp,
                                                        int64_t n) {
  const int64_t groups = kp / G, blocks = kp / kBlock;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t ahead = looplm::prefetch_bytes;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* tile = w + t * kp * 8;
    const uint16_t* s = scales + t * groups * kTile;
    __m256 acc[2][Rows];
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < Rows; ++r) acc[h][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 sv[2];
      for (int h = 0; h < 2; ++h)
        sv[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + kTile * g + 8 * h)));
      for (int64_t b = g * (G / kBlock); b < (g + 1) * (G / kBlock); ++b) {
        __m256i sum[2][Rows];
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < Rows; ++r) sum[h][r] = _mm256_setzero_si256();
        const uint8_t* src = tile + b * (kBlock * 8);
        for (int j = 0; j < 4; ++j) {
          looplm::prefetch_ahead(src + 64 * j, ahead);
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * j + 32 * h));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int r = 0; r < Rows; ++r) {
              const int8_t* xr = xq + r * kp + b * kBlock + 8 * j;
              const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xr))),
                                                     _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xr + 4))));
              sum[h][r] = _mm256_add_epi32(sum[h][r], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
        for (int r = 0; r < Rows; ++r) {
          const __m256 xsb = _mm256_set1_ps(xs[r * blocks + b]);
          for (int h = 0; h < 2; ++h)
            acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[h][r]), _mm256_mul_ps(sv[h], xsb), acc[h][r]);
        }
      }
    }
    const uint16_t* m = mins + t * groups * kTile;
    for (int64_t g = 0; g < groups; ++g)
      for (int h = 0; h < 2; ++h) {
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + kTile * g + 8 * h)));
        for (int r = 0; r < Rows; ++r)
          acc[h][r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xgroup[r * groups + g]), acc[h][r]);
      }
    const int64_t valid = std::min<int64_t>(kTile, n - kTile * t);
    alignas(32) float out[kTile];
    for (int r = 0; r < Rows; ++r) {
      _mm256_store_ps(out, acc[0][r]);
      _mm256_store_ps(out + 8, acc[1][r]);
      std::memcpy(y + r * n + kTile * t, out, valid * sizeof(float));
    }
  }
}

int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(row_bytes, 1)); }

template <typename Fn>
void dispatch_rows(int64_t rows, Fn&& fn) {
  switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

template <typename Fn>
void dispatch_group(int64_t group, Fn&& fn) {
  switch (group) {
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: fn(std::integral_constant<int, 256>{}); break;
  }
}

void check_rows(const at::Tensor& x, int64_t k, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2, name, ": bf16 CPU [M, K] input");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, name, ": 1 to 8 rows");
  TORCH_CHECK(x.size(1) == k, name, ": shape mismatch");
  TORCH_CHECK(has_avx2(), name, ": needs AVX2+FMA");
}

// The tiled int4 layout (see the top of the file) for an [n, k] weight, kp = k padded to 128.
void check_int4(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins, int64_t group, int64_t kp,
                int64_t n, const char* name) {
  TORCH_CHECK(group == 32 || group == 64 || group == 128 || group == 256, name, ": group size 32, 64, 128 or 256");
  TORCH_CHECK(kp % group == 0, name, ": the group size does not divide the padded width");
  const int64_t tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(n >= 1 && packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(0) == tiles,
              name, ": contiguous uint8 [ceil(N/16), Kp*8] packed weight");
  TORCH_CHECK(packed.size(1) == kp * 8, name, ": packed width does not match the input width");
  for (const at::Tensor* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == tiles &&
                    t->size(1) == kp / group * kTile,
                name, ": fp16 [ceil(N/16), Kp/group*16] scales and mins");
}

// The fp32 result in `scratch.y` as an [M, N] tensor: fp32, or bf16 rounded to nearest even.
at::Tensor finish(const at::Tensor& x, int64_t m, int64_t n, bool fp32_out) {
  at::Tensor out = at::empty({m, n}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  const float* y = scratch.y.data();
  if (fp32_out) {
    std::memcpy(out.data_ptr<float>(), y, m * n * sizeof(float));
    return out;
  }
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < m * n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, y + i, 4);
    dst[i] = std::isnan(y[i]) ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
  return out;
}

}  // namespace

// x [M, K] bf16 -> [xq int8 [M, Kp], xs fp32 [M, Kp/32], sum(xq) int32 [M, Kp/32]], Kp = K
// rounded up to 128: the kernels' activation quantization, exposed for tests.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2, "quantize_activations: bf16 CPU [M, K] input");
  TORCH_CHECK(has_avx2(), "quantize_activations: needs AVX2+FMA");
  const at::Tensor xc = x.contiguous();
  QuantRows& qr = quantize_rows(xc);
  const int64_t m = x.size(0);
  at::Tensor q = at::empty({m, qr.kp}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m, qr.blocks}, x.options().dtype(at::kFloat));
  at::Tensor sum = at::empty({m, qr.blocks}, x.options().dtype(at::kInt));
  std::memcpy(q.data_ptr<int8_t>(), qr.q.data(), qr.q.size());
  std::memcpy(scale.data_ptr<float>(), qr.scale.data(), qr.scale.size() * sizeof(float));
  std::memcpy(sum.data_ptr<int32_t>(), qr.sum.data(), qr.sum.size() * sizeof(int32_t));
  return {q, scale, sum};
}

// x [M, K] bf16 (M <= 8), q [N, K] int8, scale [N] fp32 -> [M, N] (bf16, or fp32 if asked).
at::Tensor int8_dot_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, bool fp32_out) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "int8_dot_linear: contiguous int8 [N, K] weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == q.size(0), "int8_dot_linear: fp32 scale [N]");
  check_rows(x, q.size(1), "int8_dot_linear");
  const int64_t m = x.size(0), k = q.size(1), n = q.size(0), kp = padded(k);
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  QuantRows& qr = quantize_rows(xc);
  qr.y.resize(m * n);
  const int8_t *xq = qr.q.data(), *wp = q.data_ptr<int8_t>();
  const float *sp = sc.data_ptr<float>(), *lanes = qr.lanes.data(), *xs = qr.scale.data();
  float* yp = qr.y.data();
  float correction[kMaxRows];
  const int64_t blocks = kp / kBlock;
  for (int64_t r = 0; r < m; ++r) {  // 128 * sum_b xs_b * sum_b(xq), see int8_vnni
    double c = 0;
    for (int64_t b = 0; b < blocks; ++b) c += double(xs[r * blocks + b]) * qr.sum[r * blocks + b];
    correction[r] = static_cast<float>(128.0 * c);
  }
  const bool vnni = use_vnni();
  dispatch_rows(m, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    at::parallel_for(0, n, grain_for(k), [&](int64_t b, int64_t e) {
      if (vnni) int8_vnni_passes<R>(xq, lanes, correction, wp, sp, yp, b, e, k, kp, n);
      else int8_avx2<R>(xq, xs, wp, sp, yp, b, e, k, kp, n);
    });
  });
  return finish(x, m, n, fp32_out);
}

// x [M, K] bf16 (M <= 8); packed, scales and mins in the tiled layout described at the top,
// for an [n, K] weight -> [M, n] (bf16, or fp32 if asked).
at::Tensor int4_dot_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& mins, int64_t group, int64_t n, bool fp32_out) {
  const int64_t m = x.size(0), k = x.size(1), kp = padded(k);
  check_rows(x, k, "int4_dot_linear");
  check_int4(packed, scales, mins, group, kp, n, "int4_dot_linear");
  const at::Tensor xc = x.contiguous();
  QuantRows& qr = quantize_rows(xc);
  const int64_t groups = kp / group, blocks = kp / kBlock, per_group = group / kBlock;
  // per row and group: sum over the group's blocks of xs_b * sum(xq), for the min term
  qr.group.assign(m * groups, 0.f);
  float* xg = qr.group.data();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) xg[r * groups + b / per_group] += qr.scale[r * blocks + b] * qr.sum[r * blocks + b];
  qr.y.resize(m * n);
  const int8_t* xq = qr.q.data();
  const float* xs = qr.scale.data();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* mp = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
  float* yp = qr.y.data();
  const bool vnni = use_vnni();
  const int64_t tiles = packed.size(0), grain = std::max<int64_t>(1, (1 << 16) / (kp * 8));
  dispatch_rows(m, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    dispatch_group(group, [&](auto g) {
      constexpr int G = decltype(g)::value;
      at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
        if (vnni) int4_vnni<R, G>(xq, xs, xg, wp, sp, mp, yp, b, e, kp, n);
        else int4_avx2<R, G>(xq, xs, xg, wp, sp, mp, yp, b, e, kp, n);
      });
    });
  });
  return finish(x, m, n, fp32_out);
}

namespace {

// One row's 8 columns from their 4 packed bytes: q * s + m in fp32.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 dequant8(int32_t bytes, __m256 s, __m256 m) {
  const __m256i shifts = _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28);  // low nibbles, then high
  const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bytes), shifts), _mm256_set1_epi32(0x0F));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, m);
}

// fp32 -> bf16, round to nearest even (finite values: weights are).
__attribute__((target("avx2,fma"), always_inline)) inline __m128i to_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit half: 4 values twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

// Rows [t_begin, t_end) of tiles, as dense rows of `out` (fp32, or bf16 when Bf16).
template <bool Bf16>
__attribute__((target("avx2,fma,f16c"))) void dequantize_tiles(const uint8_t* w, const uint16_t* scales,
                                                              const uint16_t* mins, void* out, int64_t t_begin,
                                                              int64_t t_end, int64_t group, int64_t k, int64_t kp,
                                                              int64_t n) {
  const int64_t groups = kp / group, octets = k / 8;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* tile = w + t * kp * 8;
    for (int64_t r = 0; r < kTile && kTile * t + r < n; ++r) {
      const int64_t row = kTile * t + r;
      for (int64_t j = 0; j < octets; ++j) {
        const int64_t g = j * 8 / group, at = t * groups * kTile + g * kTile + r;
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(scales[at])), mn = _mm256_set1_ps(_cvtsh_ss(mins[at]));
        const __m256 v = dequant8(load_i32(tile + 64 * j + 4 * r), s, mn);
        if constexpr (Bf16)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + row * k + 8 * j), to_bf16x8(v));
        else
          _mm256_storeu_ps(static_cast<float*>(out) + row * k + 8 * j, v);
      }
    }
  }
}

}  // namespace

// The packed int4 weight as a dense [n, k] matrix (bf16, or fp32 if asked), for prefill GEMMs;
// written into `out` when given (a reused buffer: a fresh large tensor costs page faults).
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins, int64_t group,
                           int64_t k, int64_t n, bool fp32_out, const c10::optional<at::Tensor>& out_opt) {
  const int64_t kp = padded(k);
  check_int4(packed, scales, mins, group, kp, n, "int4_dequantize");
  TORCH_CHECK(k % group == 0, "int4_dequantize: the width must be a multiple of the group size");
  TORCH_CHECK(has_avx2(), "int4_dequantize: needs AVX2+FMA");
  const at::ScalarType dtype = fp32_out ? at::kFloat : at::kBFloat16;
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.scalar_type() == dtype && out.is_contiguous() && out.dim() == 2 && out.size(0) == n &&
                    out.size(1) == k && out.device().is_cpu(),
                "int4_dequantize: out must be a contiguous CPU [N, K] tensor of the output dtype");
  } else {
    out = at::empty({n, k}, packed.options().dtype(dtype));
  }
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* mp = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
  void* op = out.data_ptr();
  at::parallel_for(0, packed.size(0), std::max<int64_t>(1, (1 << 16) / (kp * 8)), [&](int64_t b, int64_t e) {
    if (fp32_out) dequantize_tiles<false>(wp, sp, mp, op, b, e, group, k, kp, n);
    else dequantize_tiles<true>(wp, sp, mp, op, b, e, group, k, kp, n);
  });
  return out;
}
