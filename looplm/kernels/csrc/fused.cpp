// Fused elementwise ops for bf16 inference: RMSNorm and rotary embeddings.
//
// RMSNorm for bf16 inference (decode and prefill), in one pass per row instead of the
// eight tensor ops the eager module dispatches (to fp32, pow, mean, add, rsqrt, mul, to bf16,
// weight mul): at decode the per-op dispatch cost, not arithmetic, is what a norm costs, and a
// looped model runs four norms per layer pass. The numerics follow the eager module: mean of
// squares in fp32, x * (1 / sqrt(mean + eps)) rounded to bf16, then times the bf16 weight and
// rounded again. Only the order of the fp32 sum differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// bf16 <-> fp32 as c10::BFloat16 converts (round to nearest even, NaN -> 0x7FC0), written as
// plain integer ops so the compiler can vectorise the loop around them.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// The norm's output loop: bf16(w * bf16(x * inv)), vectorised where the CPU has AVX2.
inline void scale_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t h, float inv) {
  for (int64_t j = 0; j < h; ++j)
    out[j] = float_to_bf16(bf16_to_float(w[j]) * bf16_to_float(float_to_bf16(bf16_to_float(x[j]) * inv)));
}

__attribute__((target("avx2"))) void scale_row_avx2(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t h,
                                                    float inv) {
  scale_row(x, w, out, h, inv);
}

void norm_rows(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* out, int64_t begin, int64_t end,
               int64_t h, float eps) {
  constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorise the reduction
  for (int64_t r = begin; r < end; ++r) {
    const c10::BFloat16* row = x + r * h;
    float partial[kLanes] = {0};
    int64_t i = 0;
    for (; i + kLanes <= h; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float v = static_cast<float>(row[i + l]);
        partial[l] += v * v;
      }
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += partial[l];
    for (; i < h; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
    static const bool avx2 = __builtin_cpu_supports("avx2");
    (avx2 ? scale_row_avx2 : scale_row)(reinterpret_cast<const uint16_t*>(row), reinterpret_cast<const uint16_t*>(w),
                                        reinterpret_cast<uint16_t*>(out + r * h), h, inv);
  }
}

// One contiguous row of RoPE (see rope_bf16). Half the time of the strided loop's c10
// conversions at head_dim 128, where decode calls it twice per layer pass.
template <bool Rotated>
inline void rope_half(const uint16_t* x, const uint16_t* partner, const uint16_t* c, const uint16_t* s, uint16_t* out,
                      int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float rotated = Rotated ? -bf16_to_float(partner[j]) : bf16_to_float(partner[j]);
    const float a = bf16_to_float(float_to_bf16(bf16_to_float(x[j]) * bf16_to_float(c[j])));
    const float r = bf16_to_float(float_to_bf16(rotated * bf16_to_float(s[j])));
    out[j] = float_to_bf16(a + r);
  }
}

inline void rope_row(const uint16_t* x, const uint16_t* c, const uint16_t* s, uint16_t* out, int64_t d) {
  const int64_t half = d / 2;
  rope_half<true>(x, x + half, c, s, out, half);  // first half: rotate_half gives -x2
  rope_half<false>(x + half, x, c + half, s + half, out + half, half);
}

__attribute__((target("avx2"))) void rope_row_avx2(const uint16_t* x, const uint16_t* c, const uint16_t* s,
                                                   uint16_t* out, int64_t d) {
  rope_row(x, c, s, out, d);
}

}  // namespace

// x [..., H] bf16, weight [H] bf16 -> [..., H] bf16.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "rms_norm_bf16: bf16 CPU input");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.numel() == x.size(-1),
              "rms_norm_bf16: bf16 weight [H] matching the input's last dimension");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t h = input.size(-1), rows = input.numel() / std::max<int64_t>(h, 1);
  const auto* xp = input.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const float epsf = static_cast<float>(eps);
  // A decode step has 1-8 rows: one thread; splitting them would cost more than it saves.
  at::parallel_for(0, rows, std::max<int64_t>(8, (1 << 15) / std::max<int64_t>(h, 1)),
                   [&](int64_t b, int64_t e) { norm_rows(xp, wp, op, b, e, h, epsf); });
  return out;
}


// Rotary embedding, rotate-half layout, with the eager module's bf16 rounding:
//   out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)),  rotate_half(x) = [-x2, x1].
// x [B, H, S, D] with any strides (q/k come out of a transposed projection), cos/sin [B, S, D]
// contiguous. Returns a contiguous [B, H, S, D] tensor. Replaces ten tensor ops per call.
at::Tensor rope_bf16(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4, "rope_bf16: bf16 CPU [B, H, S, D] input");
  const int64_t b = x.size(0), h = x.size(1), s = x.size(2), d = x.size(3);
  TORCH_CHECK(d % 2 == 0, "rope_bf16: even head_dim");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.dim() == 3 &&
                  cos.size(0) == b && cos.size(1) == s && cos.size(2) == d && sin.sizes() == cos.sizes(),
              "rope_bf16: bf16 cos/sin [B, S, D] matching the input");
  const at::Tensor c = cos.contiguous(), sn = sin.contiguous();
  at::Tensor out = at::empty({b, h, s, d}, x.options());
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* cp = c.data_ptr<c10::BFloat16>();
  const auto* sp = sn.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t sb = x.stride(0), sh = x.stride(1), ss = x.stride(2), sd = x.stride(3), half = d / 2;
  static const bool avx2 = __builtin_cpu_supports("avx2");
  at::parallel_for(0, b * h * s, std::max<int64_t>(64, (1 << 14) / d), [&](int64_t begin, int64_t end) {
    if (sd == 1) {  // the usual layout: each row's head_dim values are contiguous
      const auto* xb = reinterpret_cast<const uint16_t*>(xp);
      const auto* cb = reinterpret_cast<const uint16_t*>(cp);
      const auto* sb_ = reinterpret_cast<const uint16_t*>(sp);
      auto* ob = reinterpret_cast<uint16_t*>(op);
      for (int64_t index = begin; index < end; ++index) {
        const int64_t bi = index / (h * s), hi = (index / s) % h, si = index % s;
        const int64_t table = (bi * s + si) * d;
        (avx2 ? rope_row_avx2 : rope_row)(xb + bi * sb + hi * sh + si * ss, cb + table, sb_ + table, ob + index * d, d);
      }
      return;
    }
    for (int64_t index = begin; index < end; ++index) {
      const int64_t bi = index / (h * s), hi = (index / s) % h, si = index % s;
      const c10::BFloat16* row = xp + bi * sb + hi * sh + si * ss;
      const c10::BFloat16* crow = cp + (bi * s + si) * d;
      const c10::BFloat16* srow = sp + (bi * s + si) * d;
      c10::BFloat16* dst = op + index * d;
      for (int64_t j = 0; j < d; ++j) {
        const float v = static_cast<float>(row[j * sd]);
        const float rotated = j < half ? -static_cast<float>(row[(j + half) * sd]) : static_cast<float>(row[(j - half) * sd]);
        const c10::BFloat16 a(v * static_cast<float>(crow[j]));
        const c10::BFloat16 r(rotated * static_cast<float>(srow[j]));
        dst[j] = c10::BFloat16(static_cast<float>(a) + static_cast<float>(r));
      }
    }
  });
  return out;
}
