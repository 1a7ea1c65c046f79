// One decoder layer's single-token decode pass as one C++ call (looplm/kernels/decode_layer.py).
//
// Decode runs the layer stack once per UT step, 96 layer passes per token on Ouro-1.4B. The
// Python plan makes about twenty calls per pass (seven projections, four norms, two RoPEs, the
// attention, SiLU, a multiply, two residual adds, views). Here the same kernels run in the
// same order on the same tensors, so the result is the same bits, and Python pays one call per
// pass: 1.3-1.5x faster decode on tiny-ouro, about 2% (noise level) on the 1.4B shape, whose
// passes are dominated by streaming weights (docs/benchmarks.md, session 8).
#include <torch/extension.h>

#include <string>
#include <vector>

// gemv.cpp, qdot.cpp, fused.cpp, attention.cpp
at::Tensor skinny_linear_bf16(const at::Tensor& x, const at::Tensor& w);
at::Tensor int8_dot_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, bool fp32_out);
at::Tensor int4_dot_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& mins, int64_t group, int64_t n, bool fp32_out);
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rope_bf16(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_attention_append_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& keys, const at::Tensor& values, int64_t slot,
                                        int64_t position, const c10::optional<at::Tensor>& mask);

// A projection without bias, as looplm's decode kernels run it: kind "bf16" (weight),
// "int8" (weight_int8, fp32 scale) or "int4" (packed, scales, mins in looplm's tiled layout).
// The kind is parsed once, here, not compared as a string on every call.
struct Projection {
  enum class Kind { kBf16, kInt8, kInt4 };
  Kind kind;
  std::vector<at::Tensor> tensors;
  int64_t group = 0, out_features = 0;

  at::Tensor operator()(const at::Tensor& rows) const {
    switch (kind) {
      case Kind::kBf16: return skinny_linear_bf16(rows, tensors[0]);
      case Kind::kInt8: return int8_dot_linear(rows, tensors[0], tensors[1], false);
      case Kind::kInt4: break;
    }
    return int4_dot_linear(rows, tensors[0], tensors[1], tensors[2], group, out_features, false);
  }
};

Projection make_projection(const std::string& kind, std::vector<at::Tensor> tensors, int64_t group,
                           int64_t out_features) {
  const size_t expected = kind == "bf16" ? 1 : kind == "int8" ? 2 : kind == "int4" ? 3 : 0;
  TORCH_CHECK(expected != 0, "Projection: kind must be bf16, int8 or int4, got ", kind);
  TORCH_CHECK(tensors.size() == expected, "Projection: ", kind, " takes ", expected, " tensors");
  const Projection::Kind parsed = expected == 1   ? Projection::Kind::kBf16
                                  : expected == 2 ? Projection::Kind::kInt8
                                                  : Projection::Kind::kInt4;
  return Projection{parsed, std::move(tensors), group, out_features};
}

// The layer: q/k/v, o, gate/up and down projections, the four norm weights in pass order
// (None where the layer has no such norm), and the attention shape.
class DecodeLayer {
 public:
  DecodeLayer(std::vector<Projection> qkv, Projection o, std::vector<Projection> gate_up, Projection down,
              std::vector<c10::optional<at::Tensor>> norms, double eps, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : qkv_(std::move(qkv)), o_(std::move(o)), gate_up_(std::move(gate_up)), down_(std::move(down)),
        norms_(std::move(norms)), eps_(eps), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {
    TORCH_CHECK(qkv_.size() == 3 && gate_up_.size() == 2 && norms_.size() == 4, "DecodeLayer: 3 + 1 + 2 + 1 projections, 4 norms");
  }

  // x [B, 1, hidden] bf16 -> the layer's output, the K/V of this pass written into slot
  // `slot`, position `position` of the full cache buffers keys/values [slots, B, H_kv, S_max, D].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys,
                     const at::Tensor& values, int64_t slot, int64_t position,
                     const c10::optional<at::Tensor>& mask) const {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "DecodeLayer: x must be [B, 1, hidden]");
    const int64_t batch = x.size(0), hidden = x.size(2), dim = head_dim_;
    const at::Tensor h = norm(0, x).view({batch, hidden});
    const at::Tensor q = qkv_[0](h), k = qkv_[1](h), v = qkv_[2](h);
    // [B, H, 1, D] views: with one position, the same memory as the modules' [B, 1, H, D] transposed
    const at::Tensor attended = decode_attention_append_bf16(
        rope_bf16(q.view({batch, heads_, 1, dim}), cos, sin), rope_bf16(k.view({batch, kv_heads_, 1, dim}), cos, sin),
        v.view({batch, kv_heads_, 1, dim}), keys, values, slot, position, mask);
    const at::Tensor attn = o_(attended.reshape({batch, heads_ * dim}));
    const at::Tensor mid = x + norm(1, attn.view({batch, 1, hidden}));
    const at::Tensor m = norm(2, mid).view({batch, hidden});
    const at::Tensor gate = gate_up_[0](m), up = gate_up_[1](m);
    const at::Tensor mlp = down_(at::silu(gate) * up);
    return mid + norm(3, mlp.view({batch, 1, hidden}));
  }

 private:
  at::Tensor norm(int index, const at::Tensor& x) const {
    return norms_[index].has_value() ? rms_norm_bf16(x, *norms_[index], eps_) : x;
  }

  std::vector<Projection> qkv_;
  Projection o_;
  std::vector<Projection> gate_up_;
  Projection down_;
  std::vector<c10::optional<at::Tensor>> norms_;
  double eps_;
  int64_t heads_, kv_heads_, head_dim_;
};

void bind_decode_layer(pybind11::module& m) {
  pybind11::class_<Projection>(m, "Projection");
  m.def("make_projection", &make_projection, "a decode projection: kind, its tensors, int4 group, out_features",
        pybind11::arg("kind"), pybind11::arg("tensors"), pybind11::arg("group") = 0, pybind11::arg("out_features") = 0);
  pybind11::class_<DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<std::vector<Projection>, Projection, std::vector<Projection>, Projection,
                          std::vector<c10::optional<at::Tensor>>, double, int64_t, int64_t, int64_t>())
      .def("forward", &DecodeLayer::forward, "one decode pass of the layer (full KV cache, whole batch)");
}
