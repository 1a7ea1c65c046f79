// Single-query attention for decode: one new token per sequence attends to its cached keys.
//
// At decode time attention reads every cached K/V row once per (step, layer); on CPU,
// torch's SDPA for a single bf16 query streams them far below the machine's bandwidth. This
// kernel walks each (batch, head) pair's keys once for the scores and its values once for
// the output, in fp32, and reads grouped-query KV heads without expanding them. The keys
// may come in several segments (the shared-KV cache keeps prefill and decoded tokens apart);
// one softmax spans them all. Numerics follow torch's CPU flash attention: fp32 scores and
// softmax, weights rounded to bf16 before they multiply V, fp32 accumulation.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

__attribute__((target("avx2,fma"))) inline __m256 widen_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, const uint16_t* k, int64_t rows, int64_t dim,
                                                      float* scores) {
  for (int64_t s = 0; s < rows; ++s) {
    const uint16_t* row = k + s * dim;
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), widen_bf16x8(row + d), acc);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    float sum = _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
    for (; d < dim; ++d) sum += q[d] * bf16_bits_to_float(row[d]);
    scores[s] = sum;
  }
}

__attribute__((target("avx2,fma"))) void accumulate_avx2(float* acc, const float* weights, const uint16_t* v,
                                                          int64_t rows, int64_t dim) {
  for (int64_t s = 0; s < rows; ++s) {
    if (weights[s] == 0.f) continue;
    const __m256 w = _mm256_set1_ps(weights[s]);
    const uint16_t* row = v + s * dim;
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8)
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(w, widen_bf16x8(row + d), _mm256_loadu_ps(acc + d)));
    for (; d < dim; ++d) acc[d] += weights[s] * bf16_bits_to_float(row[d]);
  }
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

  const ScoresFn scores_fn = use_avx512() ? scores_avx512 : scores_avx2;
  const AccumulateFn accumulate_fn = use_avx512() ? accumulate_avx512 : accumulate_avx2;
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
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < total; ++i) {
        scores[i] *= scale;
        if (!allowed || allowed[i]) max_score = std::max(max_score, scores[i]);
      }
      float denominator = 0.f;
      for (int64_t i = 0; i < total; ++i) {
        const float weight = (!allowed || allowed[i]) ? std::exp(scores[i] - max_score) : 0.f;
        denominator += weight;
        scores[i] = round_to_bf16(weight);
      }
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
