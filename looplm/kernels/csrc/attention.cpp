// Single-query attention for decode: one new token per sequence attends to its cached keys.
//
// At decode time attention reads every cached K/V row once per (step, layer); on CPU,
// torch's SDPA for a single bf16 query streams them far below the machine's bandwidth. This
// kernel walks each (batch, head) pair's keys once for the scores and its values once for
// the output, in fp32, and reads grouped-query KV heads without expanding them. The keys
// may come in several segments (the shared-KV cache keeps prefill and decoded tokens apart);
// one softmax spans them all. Numerics follow torch's CPU flash attention: fp32 scores and
// softmax, weights rounded to bf16 before they multiply V, fp32 accumulation. With AVX-512 the
// softmax is vectorised (exp by a polynomial, like torch's own vectorised exp, within about an
// ulp of std::exp), and head sizes 64 and 128 keep q and the output row in registers: at 512
// cached tokens and 16 heads a call went from 171 to 89 us on cache-resident K/V (1 thread)
// and from 236 to 195 us with K/V coming from memory (2 threads, 2-core Zen 4 VM). The AVX2
// variant does the same with 8 lanes (the same exp polynomial; four keys scored at once, 64
// output columns in registers): on an AVX2-only Zen 3, cache-resident 274-298 -> 138-155 us
// per call, from memory 329-429 -> 313-473 us (within the machine's noise: there a head's
// K/V stream is the limit).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern bool looplm_force_avx2;  // gemv.cpp

namespace {

inline float bf16_bits_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float round_to_bf16(float v) {
  return static_cast<float>(c10::BFloat16(v));  // round to nearest even, as torch does
}

// The inner loops, once per ISA. Each call covers a whole run of rows so the dispatch
// cost is paid per segment, not per key.
using ScoresFn = void (*)(const float*, const uint16_t*, int64_t, int64_t, float*);
using AccumulateFn = void (*)(float*, const float*, const uint16_t*, int64_t, int64_t);

// scores[s] = q . k[s] for `rows` key rows of `dim` bf16 values each.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void scores_avx512(const float* q, const uint16_t* k, int64_t rows,
                                                                int64_t dim, float* scores) {
  const int64_t tail = dim % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t s = 0; s < rows; ++s) {
    const uint16_t* row = k + s * dim;
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d))), 16));
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), kv, acc);
    }
    if (tail) {
      __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask, row + d)), 16));
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask, q + d), kv, acc);
    }
    scores[s] = _mm512_reduce_add_ps(acc);
  }
}

// acc += sum_s weights[s] * v[s]; rows with weight 0 (masked keys) are skipped.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void accumulate_avx512(float* acc, const float* weights,
                                                                    const uint16_t* v, int64_t rows, int64_t dim) {
  const int64_t tail = dim % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t s = 0; s < rows; ++s) {
    if (weights[s] == 0.f) continue;
    const __m512 w = _mm512_set1_ps(weights[s]);
    const uint16_t* row = v + s * dim;
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      __m512 vv = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d))), 16));
      _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(w, vv, _mm512_loadu_ps(acc + d)));
    }
    if (tail) {
      __m512 vv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask, row + d)), 16));
      _mm512_mask_storeu_ps(acc + d, tail_mask, _mm512_fmadd_ps(w, vv, _mm512_maskz_loadu_ps(tail_mask, acc + d)));
    }
  }
}

// The same two loops for a head size of 16 * C (C = 4, 8: head_dim 64, 128), with q and the
// output row held in registers. The general loops above reload and store the fp32 output row
// for every key and reduce one key's score at a time; these score four keys at once and keep
// the running sums in registers. The arithmetic, and its order, is the same: the same bits.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 widen_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void scores_avx512_fixed(const float* q, const uint16_t* k,
                                                                             int64_t rows, int64_t dim, float* scores) {
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  int64_t s = 0;
  for (; s + 4 <= rows; s += 4) {
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c)
      for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(qv[c], widen_bf16x16(k + (s + u) * dim + 16 * c), acc[u]);
    for (int u = 0; u < 4; ++u) scores[s + u] = _mm512_reduce_add_ps(acc[u]);
  }
  for (; s < rows; ++s) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], widen_bf16x16(k + s * dim + 16 * c), acc);
    scores[s] = _mm512_reduce_add_ps(acc);
  }
}

template <int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void accumulate_avx512_fixed(float* acc, const float* weights,
                                                                                 const uint16_t* v, int64_t rows,
                                                                                 int64_t dim) {
  __m512 out[C];
  for (int c = 0; c < C; ++c) out[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int64_t s = 0; s < rows; ++s) {
    if (weights[s] == 0.f) continue;
    const __m512 w = _mm512_set1_ps(weights[s]);
    for (int c = 0; c < C; ++c) out[c] = _mm512_fmadd_ps(w, widen_bf16x16(v + s * dim + 16 * c), out[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, out[c]);
}

// exp(x) for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^6
// (relative error below 2e-7, about one fp32 ulp: the weights are rounded to bf16 anyway),
// times 2^n by vscalefps, which also takes care of underflow.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp underflows to 0 well before this
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts, so r stays exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Lanes i.. of a run of `total` (the last 16 may be partial), and of those the unmasked keys.
inline __mmask16 lanes_from(int64_t i, int64_t total) {
  return total - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (total - i)) - 1);
}

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __mmask16 kept_lanes(const bool* allowed,
                                                                                               int64_t i, __mmask16 in) {
  if (!allowed) return in;
  const __m128i flags = _mm_maskz_loadu_epi8(in, allowed + i);
  return _mm_mask_cmpneq_epi8_mask(in, flags, _mm_setzero_si128());
}

// The softmax of one head's `total` scores, in place: scores * scale, then the weights
// exp(score - max) rounded to bf16 (masked keys: 0). Returns the fp32 sum of the unrounded
// weights, which divides the output. Same steps as the scalar tail of softmax_avx2.
__attribute__((target("avx512f,avx512bw,avx512vl"))) float softmax_avx512(float* scores, int64_t total, float scale,
                                                                        const bool* allowed) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < total; i += 16) {
    const __mmask16 in = lanes_from(i, total);
    const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, scores + i), vscale);
    _mm512_mask_storeu_ps(scores + i, in, s);
    vmax = _mm512_mask_max_ps(vmax, kept_lanes(allowed, i, in), vmax, s);
  }
  const __m512 max_score = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  const __m512i round_bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < total; i += 16) {
    const __mmask16 in = lanes_from(i, total);
    const __m512 w = _mm512_maskz_mov_ps(kept_lanes(allowed, i, in), exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, scores + i), max_score)));
    sum = _mm512_add_ps(sum, w);
    const __m512i bits = _mm512_castps_si512(w);  // round to nearest even bf16, kept as fp32
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
    const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(round_bias, odd)), high_half);
    _mm512_mask_storeu_ps(scores + i, in, _mm512_castsi512_ps(rounded));
  }
  return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"))) inline __m256 widen_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// One key's score from its fp32 accumulator: the same reduction order wherever it is used.
__attribute__((target("avx2,fma"), always_inline)) inline float reduce_avx2(__m256 acc) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

// Four keys at a time: one key's FMAs form a dependency chain (16 of them at head_dim 128),
// so interleaving four chains keeps the FMA units busy. Per key the arithmetic and its order
// are those of the one-key loop, so the scores are the same bits.
__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, const uint16_t* k, int64_t rows, int64_t dim,
                                                      float* scores) {
  const int64_t whole = dim - dim % 8;
  auto tail = [&](float sum, const uint16_t* row) {
    for (int64_t d = whole; d < dim; ++d) sum += q[d] * bf16_bits_to_float(row[d]);
    return sum;
  };
  int64_t s = 0;
  for (; s + 4 <= rows; s += 4) {
    const uint16_t* row = k + s * dim;
    __m256 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < whole; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(qv, widen_bf16x8(row + u * dim + d), acc[u]);
    }
    for (int u = 0; u < 4; ++u) scores[s + u] = tail(reduce_avx2(acc[u]), row + u * dim);
  }
  for (; s < rows; ++s) {
    const uint16_t* row = k + s * dim;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < whole; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), widen_bf16x8(row + d), acc);
    scores[s] = tail(reduce_avx2(acc), row);
  }
}

// acc += sum_s weights[s] * v[s] (keys with weight 0 skipped). The output columns are held in
// registers, 64 at a time, across a chunk of keys instead of loaded and stored per key; the
// chunk's V rows (8 KiB at head_dim 128) stay in L1 while each 64-column part reads them, so
// memory still sees one forward pass. Each output value adds its keys' products in key order:
// the same bits as a key-at-a-time loop.
__attribute__((target("avx2,fma"))) void accumulate_avx2(float* acc, const float* weights, const uint16_t* v,
                                                          int64_t rows, int64_t dim) {
  constexpr int kRegs = 8;
  constexpr int64_t kChunk = 32;
  const int64_t whole = dim - dim % 8;
  for (int64_t s0 = 0; s0 < rows; s0 += kChunk) {
    const int64_t s1 = std::min(rows, s0 + kChunk);
    for (int64_t d0 = 0; d0 < whole; d0 += 8 * kRegs) {
      const int regs = static_cast<int>(std::min<int64_t>(kRegs, (whole - d0) / 8));
      __m256 out[kRegs];
      for (int c = 0; c < regs; ++c) out[c] = _mm256_loadu_ps(acc + d0 + 8 * c);
      for (int64_t s = s0; s < s1; ++s) {
        if (weights[s] == 0.f) continue;
        const __m256 w = _mm256_set1_ps(weights[s]);
        const uint16_t* row = v + s * dim + d0;
        if (regs == kRegs) {  // the common case, fully unrolled
          for (int c = 0; c < kRegs; ++c) out[c] = _mm256_fmadd_ps(w, widen_bf16x8(row + 8 * c), out[c]);
        } else {
          for (int c = 0; c < regs; ++c) out[c] = _mm256_fmadd_ps(w, widen_bf16x8(row + 8 * c), out[c]);
        }
      }
      for (int c = 0; c < regs; ++c) _mm256_storeu_ps(acc + d0 + 8 * c, out[c]);
    }
    for (int64_t s = s0; s < s1; ++s)
      if (weights[s] != 0.f)
        for (int64_t d = whole; d < dim; ++d) acc[d] += weights[s] * bf16_bits_to_float(v[s * dim + d]);
  }
}

// exp(x) for 8 lanes, the AVX-512 version's polynomial (about one fp32 ulp from std::exp).
// AVX2 has no vscalefps: 2^n is built in the exponent bits, so x is clamped where 2^n stays
// a normal number, and lanes below it (true weight under 1e-38) are set to 0.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp_avx2(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.0f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
}

// Lanes i..i+7 of the mask as all-ones (attend) or zero.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 kept_lanes_avx2(const bool* allowed, int64_t i) {
  if (!allowed) return _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t bytes;
  std::memcpy(&bytes, allowed + i, sizeof(bytes));
  const __m256i flags = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
  return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256()), _mm256_set1_epi32(-1)));
}

// softmax_avx512's steps with 8 lanes; the last total % 8 keys take the scalar loop's steps.
__attribute__((target("avx2,fma"))) float softmax_avx2(float* scores, int64_t total, float scale, const bool* allowed) {
  const int64_t whole = total - total % 8;
  const __m256 vscale = _mm256_set1_ps(scale), minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = minus_inf;
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(scores + i), vscale);
    _mm256_storeu_ps(scores + i, s);
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(minus_inf, s, kept_lanes_avx2(allowed, i)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float max_score = -std::numeric_limits<float>::infinity();
  for (const float lane : lanes) max_score = std::max(max_score, lane);
  for (int64_t i = whole; i < total; ++i) {
    scores[i] *= scale;
    if (!allowed || allowed[i]) max_score = std::max(max_score, scores[i]);
  }
  const __m256 vmax_score = _mm256_set1_ps(max_score);
  const __m256i round_bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 w = _mm256_and_ps(kept_lanes_avx2(allowed, i), exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + i), vmax_score)));
    sum = _mm256_add_ps(sum, w);
    const __m256i bits = _mm256_castps_si256(w);  // round to nearest even bf16, kept as fp32
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(round_bias, odd)), high_half);
    _mm256_storeu_ps(scores + i, _mm256_castsi256_ps(rounded));
  }
  float denominator = reduce_avx2(sum);
  for (int64_t i = whole; i < total; ++i) {
    const float weight = (!allowed || allowed[i]) ? std::exp(scores[i] - max_score) : 0.f;
    denominator += weight;
    scores[i] = round_to_bf16(weight);
  }
  return denominator;
}

bool use_avx512() {
  if (looplm_force_avx2) return false;
  static const bool value = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl");
  return value;
}

struct Segment {
  const uint16_t* key;
  const uint16_t* value;
  int64_t length, batch_stride, head_stride;
};

}  // namespace

// q: [B, H, 1, D] bf16. keys/values: segments [B, H_kv, S_i, D] bf16 whose last two dims are
// contiguous. mask: optional bool [B, 1, 1, sum S_i] (True = attend). Returns [B, H, 1, D] bf16.
at::Tensor decode_attention_bf16(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                                 const std::vector<at::Tensor>& values, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention_bf16: one query per sequence");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.device().is_cpu(), "decode_attention_bf16: bf16 CPU tensors only");
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(), "decode_attention_bf16: keys and values pair up");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = keys[0].size(1);
  TORCH_CHECK(heads % kv_heads == 0, "decode_attention_bf16: heads must be a multiple of KV heads");
  const int64_t groups = heads / kv_heads;

  std::vector<Segment> segments;
  int64_t total = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    const at::Tensor &k = keys[i], &v = values[i];
    TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(1) == kv_heads && k.size(3) == dim,
                "decode_attention_bf16: segment shape mismatch");
    TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16, "decode_attention_bf16: bf16 only");
    TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == dim && v.stride(3) == 1 && v.stride(2) == dim &&
                    k.stride(0) == v.stride(0) && k.stride(1) == v.stride(1),
                "decode_attention_bf16: each head's keys and values must be contiguous rows");
    segments.push_back({reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>()),
                        reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>()), k.size(2), k.stride(0),
                        k.stride(1)});
    total += k.size(2);
  }
  const bool* mask_ptr = nullptr;
  at::Tensor mask_c;
  if (mask.has_value() && mask->defined()) {
    mask_c = mask->to(at::kBool).contiguous();
    TORCH_CHECK(mask_c.numel() == batch * total, "decode_attention_bf16: mask must be [B, 1, 1, total keys]");
    mask_ptr = mask_c.data_ptr<bool>();
  }

  // fp32 copies of q and the output in plain buffers: tensor ops (to, zeros) would each cost a
  // dispatch, which at decode is comparable to the attention itself for short contexts.
  const at::Tensor qc = q.contiguous();  // [B, H, 1, D], tiny
  const at::BFloat16* q_bf16 = qc.data_ptr<at::BFloat16>();
  std::vector<float> q32(batch * heads * dim), out32(batch * heads * dim, 0.f);
  for (size_t i = 0; i < q32.size(); ++i) q32[i] = static_cast<float>(q_bf16[i]);
  const float* qp = q32.data();
  float* op = out32.data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));

  const bool avx512 = use_avx512();
  ScoresFn scores_fn = avx512 ? scores_avx512 : scores_avx2;
  AccumulateFn accumulate_fn = avx512 ? accumulate_avx512 : accumulate_avx2;
  if (avx512 && dim == 128) {
    scores_fn = scores_avx512_fixed<8>;
    accumulate_fn = accumulate_avx512_fixed<8>;
  } else if (avx512 && dim == 64) {
    scores_fn = scores_avx512_fixed<4>;
    accumulate_fn = accumulate_avx512_fixed<4>;
  }
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(total);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, kv = h / groups;
      int64_t pos = 0;
      for (const Segment& seg : segments) {
        scores_fn(qp + bh * dim, seg.key + b * seg.batch_stride + kv * seg.head_stride, seg.length, dim, &scores[pos]);
        pos += seg.length;
      }
      // Softmax in fp32; masked keys get weight 0. The weights are rounded to bf16 before
      // they multiply V, as torch's CPU flash attention does; the sum stays fp32.
      const bool* allowed = mask_ptr ? mask_ptr + b * total : nullptr;
      const float denominator = avx512 ? softmax_avx512(scores.data(), total, scale, allowed)
                                       : softmax_avx2(scores.data(), total, scale, allowed);
      float* acc = op + bh * dim;
      pos = 0;
      for (const Segment& seg : segments) {
        accumulate_fn(acc, &scores[pos], seg.value + b * seg.batch_stride + kv * seg.head_stride, seg.length, dim);
        pos += seg.length;
      }
      const float inverse = denominator > 0.f ? 1.0f / denominator : 0.f;
      for (int64_t d = 0; d < dim; ++d) acc[d] *= inverse;
    }
  });
  at::Tensor out = at::empty({batch, heads, 1, dim}, q.options());
  at::BFloat16* out_bf16 = out.data_ptr<at::BFloat16>();
  for (size_t i = 0; i < out32.size(); ++i) out_bf16[i] = at::BFloat16(out32[i]);  // round to nearest even
  return out;
}

// A full KV cache's decode step in one call: write the new token's k, v [B, H_kv, 1, D] at
// `position` of slot `slot` in keys/values [slots, B, H_kv, S_max, D], then attend over
// positions 0..position. The cache's Python update (index, slice, copy, twice, then two
// slices to read) cost about 50 us per layer pass. The buffers may be views (the server's
// batch uses the first B rows of a larger one) as long as each head's positions are
// contiguous rows of D values.
at::Tensor decode_attention_append_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& keys, const at::Tensor& values, int64_t slot,
                                        int64_t position, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(keys.dim() == 5 && keys.sizes() == values.sizes(),
              "decode_attention_append_bf16: keys/values [slots, B, H_kv, S_max, D] of one shape");
  TORCH_CHECK(keys.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 &&
                  k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention_append_bf16: bf16 only");
  const int64_t batch = keys.size(1), kv_heads = keys.size(2), max_len = keys.size(3), dim = keys.size(4);
  TORCH_CHECK(keys.stride(4) == 1 && keys.stride(3) == dim && values.stride(4) == 1 && values.stride(3) == dim,
              "decode_attention_append_bf16: each head's positions must be contiguous rows");
  TORCH_CHECK(0 <= slot && slot < keys.size(0) && 0 <= position && position < max_len,
              "decode_attention_append_bf16: slot or position outside the cache");
  const std::vector<int64_t> one_token = {batch, kv_heads, 1, dim};
  TORCH_CHECK(k.sizes() == one_token && v.sizes() == one_token, "decode_attention_append_bf16: k, v must be [B, H_kv, 1, D]");
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor key_slot = keys.select(0, slot), value_slot = values.select(0, slot);
  auto* key_base = key_slot.data_ptr<at::BFloat16>();
  auto* value_base = value_slot.data_ptr<at::BFloat16>();
  const auto* k_new = kc.data_ptr<at::BFloat16>();
  const auto* v_new = vc.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t row = b * kv_heads + h;  // in k and v, contiguous [B, H_kv, 1, D]
      std::memcpy(key_base + b * key_slot.stride(0) + h * key_slot.stride(1) + position * dim, k_new + row * dim,
                  dim * sizeof(at::BFloat16));
      std::memcpy(value_base + b * value_slot.stride(0) + h * value_slot.stride(1) + position * dim, v_new + row * dim,
                  dim * sizeof(at::BFloat16));
    }
  return decode_attention_bf16(q, {key_slot.narrow(2, 0, position + 1)}, {value_slot.narrow(2, 0, position + 1)}, mask);
}
