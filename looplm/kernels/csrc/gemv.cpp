// Skinny bf16 matmul for decode: y[m, n] = sum_k x[m, k] * w[n, k], fp32 accumulation.
//
// At decode time a linear layer multiplies a handful of activation rows (M <= 8) by a
// weight matrix read once from memory, so speed is set by how fast the weights stream in.
// torch's bf16 F.linear at M=1 reaches a fraction of the machine's read bandwidth on CPU;
// this kernel streams each weight row once, keeps M accumulators, and splits the output
// rows across threads. Variants are compiled for AVX-512 BF16 and for AVX2+FMA and picked
// at run time from the CPU's features.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "stream.h"

// Tests force the AVX2 variants on AVX-512 machines so both stay covered (attention.cpp too).
bool looplm_force_avx2 = false;
// AVX-512 BF16 skinny kernel, weight rows per pass: 0 = by the activation rows; 1-4 forces it
// (tests cover every variant, benchmarks compare them). The choice, from batched decode of the
// Ouro-1.4B shape on a 2-vCPU Zen 4 (the two settings alternating in one process, paired):
// against one weight row per pass, 4 per pass gave 0.94x at 2 rows, 0.98x at 3, 1.06x at 4,
// 1.32x at 5, 1.54x at 6; 3 per pass 1.46x at 7 and 1.63x at 8 (4 would need 32 registers).
int64_t looplm_weight_rows_per_pass = 0;

int64_t looplm::prefetch_bytes = 16384;  // stream.h

namespace {

constexpr int64_t kMaxRows = 8;

// bf16 -> fp32 is a 16-bit left shift of the bit pattern.
__attribute__((target("avx2,fma"))) inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// x32: activations already widened to fp32, [rows, k]. Weights stay bf16.
template <int Rows>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x32, const uint16_t* w, float* y,
                                                   int64_t n_begin, int64_t n_end, int64_t k, int64_t n) {
  const int64_t ahead = looplm::prefetch_bytes;
  for (int64_t o = n_begin; o < n_end; ++o) {
    const uint16_t* wrow = w + o * k;
    __m256 acc[Rows], acc2[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = acc2[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      if ((i & 31) == 0) looplm::prefetch_ahead(wrow + i, ahead);  // once per 64 bytes
      __m256 wa = load_bf16x8(wrow + i), wb = load_bf16x8(wrow + i + 8);
      for (int r = 0; r < Rows; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x32 + r * k + i), wa, acc[r]);
        acc2[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x32 + r * k + i + 8), wb, acc2[r]);
      }
    }
    for (; i + 8 <= k; i += 8) {
      __m256 wv = load_bf16x8(wrow + i);
      for (int r = 0; r < Rows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x32 + r * k + i), wv, acc[r]);
    }
    for (int r = 0; r < Rows; ++r) {
      float sum = hsum256(_mm256_add_ps(acc[r], acc2[r]));
      for (int64_t j = i; j < k; ++j) sum += x32[r * k + j] * bf16_to_float(wrow[j]);
      y[r * n + o] = sum;
    }
  }
}

// AVX-512 BF16: vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32.
template <int Rows>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_avx512bf16(
    const uint16_t* x, const uint16_t* w, float* y, int64_t n_begin, int64_t n_end, int64_t k, int64_t n) {
  const int64_t tail = k % 32;
  const __mmask32 tail_mask = tail ? static_cast<__mmask32>((1ULL << tail) - 1) : 0;
  for (int64_t o = n_begin; o < n_end; ++o) {
    const uint16_t* wrow = w + o * k;
    __m512 acc[Rows], acc2[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = acc2[r] = _mm512_setzero_ps();
    int64_t i = 0;
    // Two independent accumulator sets hide the dot-product latency when Rows is small. No
    // software prefetch here: this loop is light enough for the hardware prefetchers, and
    // prefetching made decode about 10% slower in a model (stream.h).
    for (; i + 64 <= k; i += 64) {
      __m512bh wa = (__m512bh)_mm512_loadu_si512(wrow + i);
      __m512bh wb = (__m512bh)_mm512_loadu_si512(wrow + i + 32);
      for (int r = 0; r < Rows; ++r) {
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(x + r * k + i), wa);
        acc2[r] = _mm512_dpbf16_ps(acc2[r], (__m512bh)_mm512_loadu_si512(x + r * k + i + 32), wb);
      }
    }
    for (; i + 32 <= k; i += 32) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(wrow + i);
      for (int r = 0; r < Rows; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(x + r * k + i), wv);
    }
    if (tail) {
      __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, wrow + i);
      for (int r = 0; r < Rows; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, x + r * k + i), wv);
    }
    for (int r = 0; r < Rows; ++r) y[r * n + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
  }
}

// Several activation rows: Outs weight rows per pass, so each activation load feeds Outs dot
// products. With one weight row per pass, 8 rows of a 2048-wide input (32 KiB) do not stay
// in L1 beside the weight stream, and the activation loads, not memory, set the pace: on a Zen 4
// that kernel ran M=8 at 0.70x torch's bf16 GEMM (2048 -> 5632), this one at 1.1-1.3x. One
// accumulator per (weight row, activation row), at most 24 registers, enough independent chains
// to hide the latency.
template <int Rows, int Outs>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void outs_avx512bf16(
    const uint16_t* x, const uint16_t* w, float* y, int64_t n_begin, int64_t n_end, int64_t k, int64_t n) {
  const int64_t tail = k % 32;
  const __mmask32 tail_mask = tail ? static_cast<__mmask32>((1ULL << tail) - 1) : 0;
  int64_t o = n_begin;
  for (; o + Outs <= n_end; o += Outs) {
    const uint16_t* wo = w + o * k;
    __m512 acc[Outs][Rows];
    for (int j = 0; j < Outs; ++j)
      for (int r = 0; r < Rows; ++r) acc[j][r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      __m512bh wv[Outs];
      for (int j = 0; j < Outs; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wo + j * k + i);
      for (int r = 0; r < Rows; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * k + i);
        for (int j = 0; j < Outs; ++j) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[j]);
      }
    }
    if (tail) {
      __m512bh wv[Outs];
      for (int j = 0; j < Outs; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, wo + j * k + i);
      for (int r = 0; r < Rows; ++r) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, x + r * k + i);
        for (int j = 0; j < Outs; ++j) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[j]);
      }
    }
    for (int j = 0; j < Outs; ++j)
      for (int r = 0; r < Rows; ++r) y[r * n + o + j] = _mm512_reduce_add_ps(acc[j][r]);
  }
  if (o < n_end) rows_avx512bf16<Rows>(x, w, y, o, n_end, k, n);  // the rows left over
}

int weight_rows_per_pass(int rows) {
  if (looplm_weight_rows_per_pass) return static_cast<int>(looplm_weight_rows_per_pass);
  return rows <= 3 ? 1 : rows <= 6 ? 4 : 3;
}

bool has_avx512bf16() {
  static const bool value = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return value && !looplm_force_avx2;
}

bool has_avx2() {
  static const bool value = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return value;
}

template <int Rows>
void run_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& y32, const at::Tensor& x32) {
  const int64_t k = x.size(1), n = w.size(0);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y32.data_ptr<float>();
  // Grain: enough rows per task that each thread streams a long contiguous run of weights.
  const int64_t grain = std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(k, 1));
  if (has_avx512bf16()) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
      switch (weight_rows_per_pass(Rows)) {
        case 2: outs_avx512bf16<Rows, 2>(xp, wp, yp, b, e, k, n); break;
        case 3: outs_avx512bf16<Rows, 3>(xp, wp, yp, b, e, k, n); break;
        case 4: outs_avx512bf16<Rows, (Rows <= 6 ? 4 : 3)>(xp, wp, yp, b, e, k, n); break;  // <= 24 accumulators
        default: rows_avx512bf16<Rows>(xp, wp, yp, b, e, k, n); break;
      }
    });
  } else {
    const float* xp = x32.data_ptr<float>();
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { rows_avx2<Rows>(xp, wp, yp, b, e, k, n); });
  }
}

}  // namespace

// x: [M, K] bf16 contiguous with M <= 8; w: [N, K] bf16 contiguous. Returns [M, N] bf16.
at::Tensor skinny_linear_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear_bf16: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "skinny_linear_bf16: bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear_bf16: shape mismatch");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "skinny_linear_bf16: 1 to 8 rows");
  TORCH_CHECK(has_avx512bf16() || has_avx2(), "skinny_linear_bf16: needs AVX2+FMA");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y32 = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor x32 = has_avx512bf16() ? at::Tensor() : xc.to(at::kFloat);
  switch (x.size(0)) {
    case 1: run_rows<1>(xc, wc, y32, x32); break;
    case 2: run_rows<2>(xc, wc, y32, x32); break;
    case 3: run_rows<3>(xc, wc, y32, x32); break;
    case 4: run_rows<4>(xc, wc, y32, x32); break;
    case 5: run_rows<5>(xc, wc, y32, x32); break;
    case 6: run_rows<6>(xc, wc, y32, x32); break;
    case 7: run_rows<7>(xc, wc, y32, x32); break;
    default: run_rows<8>(xc, wc, y32, x32); break;
  }
  // Round to bf16 here rather than with a tensor op: one dispatch less per decode GEMV.
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  const float* y32p = y32.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  for (int64_t i = 0, count = y.numel(); i < count; ++i) yp[i] = at::BFloat16(y32p[i]);
  return y;
}

void set_force_avx2(bool value) { looplm_force_avx2 = value; }

void set_weight_rows_per_pass(int64_t value) {
  TORCH_CHECK(value >= 0 && value <= 4, "set_weight_rows_per_pass: 0 (by the activation rows) to 4");
  looplm_weight_rows_per_pass = value;
}

void set_prefetch_bytes(int64_t value) {
  TORCH_CHECK(value >= 0 && value <= (1 << 20), "set_prefetch_bytes: 0 (off) to 1 MiB");
  looplm::prefetch_bytes = value;
}

std::string cpu_path() {
  if (has_avx512bf16()) return "avx512bf16";
  if (has_avx2()) return "avx2";
  return "none";
}

at::Tensor decode_attention_bf16(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                                 const std::vector<at::Tensor>& values, const c10::optional<at::Tensor>& mask);
at::Tensor decode_attention_append_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& keys, const at::Tensor& values, int64_t slot,
                                        int64_t position, const c10::optional<at::Tensor>& mask);

// fused.cpp
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rope_bf16(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// qdot.cpp
std::vector<at::Tensor> quantize_activations(const at::Tensor& x);
at::Tensor int8_dot_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, bool fp32_out);
at::Tensor int4_dot_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& mins, int64_t group, int64_t n, bool fp32_out);
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins, int64_t group,
                           int64_t k, int64_t n, bool fp32_out, const c10::optional<at::Tensor>& out);

void set_int8_rows_per_pass(int64_t value);

// layer.cpp
void bind_decode_layer(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_decode_layer(m);
  m.def("quantize_activations", &quantize_activations, "bf16 rows -> int8 blocks of 32, scales, block sums");
  m.def("int8_dot_linear", &int8_dot_linear, "bf16 x @ (scale * int8 W).T for 1-8 rows, int8 activations",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("fp32_out") = false);
  m.def("int4_dot_linear", &int4_dot_linear, "bf16 x @ packed int4 W.T for 1-8 rows, int8 activations",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("mins"), py::arg("group"),
        py::arg("out_features"), py::arg("fp32_out") = false);
  m.def("int4_dequantize", &int4_dequantize, "packed int4 W -> dense [N, K] bf16 (or fp32)",
        py::arg("packed"), py::arg("scales"), py::arg("mins"), py::arg("group"), py::arg("k"),
        py::arg("out_features"), py::arg("fp32_out") = false, py::arg("out") = py::none());
  m.def("decode_attention_bf16", &decode_attention_bf16, "single-query bf16 attention over KV segments");
  m.def("decode_attention_append_bf16", &decode_attention_append_bf16,
        "write one token's K/V into a full cache slot, then single-query attention over it");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows, the eager module's rounding, one pass");
  m.def("rope_bf16", &rope_bf16, "rotary embedding (rotate-half) of bf16 [B, H, S, D], the eager rounding");
  m.def("skinny_linear_bf16", &skinny_linear_bf16, "bf16 x @ w.T for 1-8 rows, fp32 accumulation");
  m.def("cpu_path", &cpu_path, "which kernel variant this CPU runs");
  m.def("set_prefetch_bytes", &set_prefetch_bytes, "how far ahead the decode kernels prefetch weights (0: off)");
  m.def("set_int8_rows_per_pass", &set_int8_rows_per_pass,
        "int8 VNNI kernel: weight rows per pass for 3-8 rows, 0 = automatic (tests, benchmarks)");
  m.def("set_weight_rows_per_pass", &set_weight_rows_per_pass,
        "AVX-512 BF16 skinny kernel: weight rows per pass, 0 = by the activation rows (tests, benchmarks)");
  m.def("set_force_avx2", &set_force_avx2, "use the AVX2 variant even where AVX-512 BF16 exists (tests)");
}
