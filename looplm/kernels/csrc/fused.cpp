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

namespace {

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
    c10::BFloat16* dst = out + r * h;
    for (int64_t j = 0; j < h; ++j) {
      const c10::BFloat16 normed(static_cast<float>(row[j]) * inv);
      dst[j] = c10::BFloat16(static_cast<float>(w[j]) * static_cast<float>(normed));
    }
  }
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
  at::parallel_for(0, b * h * s, std::max<int64_t>(64, (1 << 14) / d), [&](int64_t begin, int64_t end) {
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
