"""looplm's C++ CPU kernels: the skinny bf16 linear and its swap into loaded models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import looplm
from looplm.kernels.extension import extension_or_reason
from looplm.kernels.cpu import SkinnyLinear, apply_kernels, choose_prefill_route

kernels, cpu_path = extension_or_reason()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"CPU kernels unavailable: {cpu_path}")


@pytest.fixture(params=["native", "avx2"])
def variant(request):  # noqa: ANN001, ANN201 - both code paths on AVX-512 machines too
    kernels.set_force_avx2(request.param == "avx2")
    yield request.param
    kernels.set_force_avx2(False)


def exact_bf16_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().T).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("in_features", [64, 96, 200, 2048])  # full chunks, 32-tails, odd tails
def test_skinny_linear_matches_exact_product(variant: str, rows: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    w = torch.randn(77, in_features, generator=generator).bfloat16()
    ours = kernels.skinny_linear_bf16(x, w)
    exact = exact_bf16_product(x, w)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 77)
    # fp32 accumulation, one rounding to bf16 at the end: within one bf16 ulp of the exact sum
    assert ((ours.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3 * in_features**0.5).all()
    torch_out = F.linear(x, w).float()
    assert (ours.float() - torch_out).abs().max() <= (exact.abs().max() * 2**-7)


def test_skinny_linear_rejects_bad_input() -> None:
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        kernels.skinny_linear_bf16(torch.randn(9, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match="bf16 only"):
        kernels.skinny_linear_bf16(torch.randn(1, 16), w.float())
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.skinny_linear_bf16(torch.randn(1, 8).bfloat16(), w)


def make_skinny(in_features: int, out_features: int, bias: bool, route: str = "bf16") -> tuple[torch.nn.Linear, SkinnyLinear]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(in_features, out_features, bias=bias).bfloat16()
    skinny = SkinnyLinear(in_features, out_features, bias=bias, device="meta")
    skinny.weight, skinny.bias = plain.weight, plain.bias
    skinny.prefill_route = route
    return plain, skinny


@pytest.mark.parametrize("route", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 1, 64), (1, 8, 64), (3, 5, 64)])  # decode rows and a prefill
def test_skinny_module_agrees_with_linear(route: str, shape: tuple[int, int, int]) -> None:
    plain, skinny = make_skinny(64, 48, bias=True, route=route)
    x = torch.randn(*shape).bfloat16()
    with torch.inference_mode():
        ours, ref = skinny(x), plain(x)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    assert (ours.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-6


def test_skinny_module_trains_like_linear() -> None:
    plain, skinny = make_skinny(32, 16, bias=False)
    x = torch.randn(1, 32).bfloat16()
    skinny(x).float().sum().backward()  # grad mode with a trainable weight: plain F.linear
    assert plain.weight.grad is not None and torch.equal(plain.weight.grad[0], x[0].expand(16, 32)[0])


def test_prefill_route_follows_cpu() -> None:
    assert choose_prefill_route("avx512bf16") == "bf16"
    assert choose_prefill_route("avx2") == "fp32"


def test_load_swaps_bf16_linears_and_keeps_the_gate(make_checkpoint) -> None:  # noqa: ANN001
    path = make_checkpoint(num_key_value_heads=2)
    fast = looplm.load(path, dtype="bfloat16")
    plain = looplm.load(path, dtype="bfloat16", kernels="torch")
    assert fast.kernels["linears"] == 7 * fast.config.num_hidden_layers + 1  # projections + lm_head
    assert isinstance(fast.model.layers[0].mlp.down_proj, SkinnyLinear)
    assert type(fast.model.early_exit_gate) is torch.nn.Linear
    assert plain.kernels is None and type(plain.lm_head) is torch.nn.Linear
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert looplm.load(path, dtype="float32").kernels is None  # fp32 stays on torch
    prompt = torch.tensor([[5, 9, 2, 33, 7, 1]])
    assert fast.generate(prompt, 12) == plain.generate(prompt, 12)


def test_unknown_kernel_mode_is_a_clear_error() -> None:
    model = torch.nn.Linear(4, 4).bfloat16()
    with pytest.raises(looplm.errors.ConfigError, match="kernels 'fast'"):
        apply_kernels(model, "fast")


def test_env_switch_turns_kernels_off(make_checkpoint, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("LOOPLM_KERNELS", "torch")
    model = looplm.load(make_checkpoint(), dtype="bfloat16")
    assert model.kernels is None


def reference_attention(q: torch.Tensor, keys: list, values: list, mask: torch.Tensor | None) -> torch.Tensor:
    """fp64 SDPA over the concatenated segments, grouped-query heads expanded."""
    k, v = torch.cat(keys, dim=2).double(), torch.cat(values, dim=2).double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (8, 2, 24), (4, 1, 128), (2, 2, 200)])
@pytest.mark.parametrize("segments", [[37], [20, 5], [1, 64, 3]])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_sdpa(variant: str, heads: int, kv_heads: int, dim: int, segments: list[int],
                                       masked: bool) -> None:
    generator = torch.Generator().manual_seed(heads * 100 + dim + len(segments))
    batch, total = 3, sum(segments)
    # keys/values as views into a longer preallocated buffer, like the cache's slices
    buffers = [torch.randn(batch, kv_heads, n + 7, dim, generator=generator).bfloat16() for n in segments]
    keys = [b[:, :, :n] for b, n in zip(buffers, segments)]
    values = [(b * 0.5 + 1)[:, :, :n] for b, n in zip(buffers, segments)]
    q = torch.randn(batch, 1, heads, dim, generator=generator).bfloat16().transpose(1, 2)  # as the model makes it
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, total, generator=generator) > 0.4
        mask[..., -1] = True  # every query sees at least itself, as AttentionBias guarantees
    ours = kernels.decode_attention_bf16(q, keys, values, mask)
    exact = reference_attention(q, keys, values, mask)
    assert ours.shape == (batch, heads, 1, dim) and ours.dtype == torch.bfloat16
    # weights rounded to bf16 before multiplying V (as torch's CPU flash attention), output in bf16
    assert (ours.double() - exact).abs().max() <= 2**-7 * exact.abs().max() + 1e-3


def test_decode_attention_rejects_bad_input() -> None:
    k = torch.randn(1, 2, 5, 16).bfloat16()
    with pytest.raises(RuntimeError, match="one query"):
        kernels.decode_attention_bf16(torch.randn(1, 2, 2, 16).bfloat16(), [k], [k], None)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        interleaved = torch.randn(1, 5, 2, 16).bfloat16().transpose(1, 2)  # right shape, rows not contiguous
        kernels.decode_attention_bf16(torch.randn(1, 2, 1, 16).bfloat16(), [interleaved], [interleaved], None)


@pytest.mark.parametrize("kv_mode", ["full", "shared"])
def test_kernels_decode_like_torch_in_fp32_accumulation(make_checkpoint, kv_mode: str) -> None:  # noqa: ANN001
    """Same greedy tokens and close per-step logits with and without the kernels, padded batch."""
    path = make_checkpoint(num_key_value_heads=2)
    fast = looplm.load(path, dtype="bfloat16")
    plain = looplm.load(path, dtype="bfloat16", kernels="torch")
    assert fast.kernels["attention"] == fast.config.num_hidden_layers
    prompt = torch.tensor([[0, 0, 5, 9, 2, 33], [4, 8, 15, 16, 23, 42]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    args = dict(attention_mask=mask, kv_mode=kv_mode, exit_policy="last")
    assert fast.generate(prompt, 10, **args) == plain.generate(prompt, 10, **args)


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("in_features", [64, 200, 2048])
def test_int8_linear_matches_exact_product(variant: str, rows: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(rows + in_features)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    q = torch.randint(-127, 128, (40, in_features), generator=generator, dtype=torch.int8)
    scale = torch.rand(40, generator=generator) * 0.01
    ours = kernels.int8_linear_bf16(x, q, scale)
    exact = (x.double() @ q.double().T) * scale.double()
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 40)
    assert ((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def test_int8_model_uses_the_decode_kernel(make_checkpoint) -> None:  # noqa: ANN001
    from looplm.quant.linear import Int8Linear

    model = looplm.load(make_checkpoint(), dtype="bfloat16", quant="int8")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Int8Linear) and layer.decode_kernel is not None
    assert model.kernels["int8_linears"] == 7 * model.config.num_hidden_layers
    x = torch.randn(3, 1, layer.in_features).bfloat16()
    with torch.inference_mode():
        ours = layer(x)
        layer.decode_kernel = None  # torch's fused int8 op for the same rows
        theirs = layer(x)
    assert (ours.float() - theirs.float()).abs().max() <= theirs.float().abs().max() * 2**-6


def test_a_left_over_build_lock_does_not_block_loading() -> None:
    """A process killed inside torch's builder leaves `lock` behind; a built library must still load."""
    import subprocess
    import sys

    from looplm.kernels.extension import build_name, cache_dir

    lock = cache_dir() / build_name() / "lock"
    lock.touch()
    try:
        code = "from looplm.kernels.extension import load_extension; print(load_extension().cpu_path())"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == cpu_path
    finally:
        lock.unlink(missing_ok=True)
