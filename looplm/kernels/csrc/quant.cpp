// Weight-only int8 matmul for decode (1-8 activation rows), bf16 activations:
//   y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
// Decode streams every weight once per token, so half the bytes of bf16 means up to twice
// the tokens per second, provided unpacking stays cheaper than the memory it saves. The
// weights are widened to fp32 in registers and accumulated in fp32. (int4 uses torch's own
// CPU kernel, `_weight_int4pack_mm_for_cpu`, which measured faster than a kernel written
// in this style.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

extern bool looplm_force_avx2;  // gemv.cpp

namespace {

constexpr int64_t kMaxRows = 8;

bool use_avx512() {
  if (looplm_force_avx2) return false;
  static const bool value = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return value;
}

// Independent accumulator chains per row: with one chain, FMA latency (not memory) would set
// the speed at small row counts.
template <int Rows>
constexpr int chains() { return Rows == 1 ? 4 : (Rows == 2 ? 2 : 1); }

template <int Rows>
__attribute__((target("avx512f,avx512bw"))) void int8_rows_avx512(const float* x, const int8_t* q, const float* scale,
                                                                   float* y, int64_t n_begin, int64_t n_end, int64_t k,
                                                                   int64_t n) {
  constexpr int U = chains<Rows>();
  for (int64_t o = n_begin; o < n_end; ++o) {
    const int8_t* row = q + o * k;
    __m512 acc[Rows][U];
    for (int r = 0; r < Rows; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 * U <= k; i += 16 * U) {
      for (int u = 0; u < U; ++u) {
        __m512 w = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i + 16 * u))));
        for (int r = 0; r < Rows; ++r) acc[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i + 16 * u), w, acc[r][u]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      __m512 total = acc[r][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[r][u]);
      float sum = _mm512_reduce_add_ps(total);
      for (int64_t j = i; j < k; ++j) sum += x[r * k + j] * row[j];
      y[r * n + o] = sum * scale[o];
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int Rows>
__attribute__((target("avx2,fma"))) void int8_rows_avx2(const float* x, const int8_t* q, const float* scale, float* y,
                                                         int64_t n_begin, int64_t n_end, int64_t k, int64_t n) {
  constexpr int U = chains<Rows>();
  for (int64_t o = n_begin; o < n_end; ++o) {
    const int8_t* row = q + o * k;
    __m256 acc[Rows][U];
    for (int r = 0; r < Rows; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 * U <= k; i += 8 * U) {
      for (int u = 0; u < U; ++u) {
        __m256 w = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i + 8 * u))));
        for (int r = 0; r < Rows; ++r) acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8 * u), w, acc[r][u]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      __m256 total = acc[r][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[r][u]);
      float sum = hsum(total);
      for (int64_t j = i; j < k; ++j) sum += x[r * k + j] * row[j];
      y[r * n + o] = sum * scale[o];
    }
  }
}

int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(row_bytes, 1)); }

void check_rows(const at::Tensor& x, int64_t k, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2, name, ": bf16 CPU [M, K] input");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, name, ": 1 to 8 rows");
  TORCH_CHECK(x.size(1) == k, name, ": shape mismatch");
}

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

}  // namespace

// x [M, K] bf16 (M <= 8), q [N, K] int8, scale [N] fp32 -> [M, N] bf16.
at::Tensor int8_linear_bf16(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "int8_linear_bf16: contiguous int8 [N, K] weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == q.size(0), "int8_linear_bf16: fp32 scale [N]");
  check_rows(x, q.size(1), "int8_linear_bf16");
  const int64_t k = q.size(1), n = q.size(0);
  at::Tensor x32 = x.to(at::kFloat).contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  const float *xp = x32.data_ptr<float>(), *sp = sc.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const bool wide = use_avx512();
  dispatch_rows(x.size(0), [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    at::parallel_for(0, n, grain_for(k), [&](int64_t b, int64_t e) {
      if (wide) int8_rows_avx512<R>(xp, qp, sp, yp, b, e, k, n);
      else int8_rows_avx2<R>(xp, qp, sp, yp, b, e, k, n);
    });
  });
  return y.to(at::kBFloat16);
}
