"""looplm's C++ CPU kernels: the skinny bf16 linear and its swap into loaded models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import looplm
from looplm.kernels import cpu as cpu_module
from looplm.kernels.cpu import SkinnyLinear, apply_kernels, choose_prefill_route
from looplm.kernels.extension import extension_or_reason

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


@pytest.mark.skipif(cpu_path != "avx512bf16", reason="the weight-row passes are the AVX-512 BF16 kernel's")
@pytest.mark.parametrize("per_pass", [0, 1, 2, 3, 4])
def test_skinny_linear_every_weight_rows_per_pass_gives_the_product(per_pass: int) -> None:
    """AVX-512 BF16 runs 2-8 activation rows against 3 or 4 weight rows per pass. Every count
    (0: the automatic choice), for every row count, with output widths that leave 1-3 weight rows
    over in each thread's range (and in a range too short for one pass), and 32-column tails."""
    kernels.set_weight_rows_per_pass(per_pass)
    try:
        for rows in range(1, 9):
            for out_features, in_features in [(77, 96), (35, 70), (2, 2048), (1091, 200)]:
                generator = torch.Generator().manual_seed(rows * 10000 + out_features + in_features)
                x = torch.randn(rows, in_features, generator=generator).bfloat16()
                w = torch.randn(out_features, in_features, generator=generator).bfloat16()
                ours, exact = kernels.skinny_linear_bf16(x, w).float(), exact_bf16_product(x, w)
                assert ((ours - exact).abs() <= exact.abs() * 2**-8 + 1e-3 * in_features**0.5).all(), (rows, out_features)
    finally:
        kernels.set_weight_rows_per_pass(0)
    with pytest.raises(RuntimeError, match="0 .* to 4"):
        kernels.set_weight_rows_per_pass(5)


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


@pytest.mark.parametrize("rows", [9, 13, 16])
def test_a_short_prompt_on_the_fp32_route_is_skinny_chunks_with_decodes_bits(rows: int) -> None:
    """9-16 rows on the upcasting route run as skinny-kernel chunks: each row gets exactly the
    bits it gets alone (as in decode); more rows, and the bf16 route, keep their GEMMs."""
    plain, skinny = make_skinny(512, 48, bias=False, route="fp32")
    x = torch.randn(2, (rows + 1) // 2, 512).bfloat16()  # a batch of two prompts: 10, 14 or 16 rows
    upcasts: list[int] = []
    real = cpu_module.upcast_linear
    cpu_module.upcast_linear = lambda x, weight: (upcasts.append(x.shape[0]), real(x, weight))[1]
    try:
        with torch.inference_mode():
            together = skinny(x).reshape(-1, 48)
            alone = torch.cat([skinny(row.reshape(1, 512)) for row in x.reshape(-1, 512)])
            assert not upcasts and torch.equal(together, alone)
            skinny(torch.randn(17, 512).bfloat16())
    finally:
        cpu_module.upcast_linear = real
    assert len(upcasts) == 1  # 17 rows: the fp32 GEMM


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


@pytest.mark.parametrize("shape", [(1, 64), (3, 256), (8, 2048), (2, 5, 2050), (1, 5632)])
def test_fused_rms_norm_is_bit_identical_to_the_module(shape: tuple[int, ...]) -> None:
    from looplm.models.ouro import RMSNorm

    torch.manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], 1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]) * 0.5 + 1)
        x = (torch.randn(*shape) * 3).bfloat16()
        assert torch.equal(kernels.rms_norm_bf16(x, norm.weight, 1e-6), norm(x))
    with pytest.raises(RuntimeError, match="weight"):
        kernels.rms_norm_bf16(x, norm.weight[:-1], 1e-6)


@pytest.mark.parametrize("shape", [(1, 16, 1, 128), (2, 4, 7, 64), (3, 2, 5, 32), (1, 3, 2, 6)])
@pytest.mark.parametrize("every_other", [False, True])  # True: head_dim not contiguous (the generic loop)
def test_fused_rope_is_bit_identical_to_eager(shape: tuple[int, int, int, int], every_other: bool) -> None:
    from looplm.models.ouro import apply_rope, rope_tables

    batch, heads, seq, dim = shape
    torch.manual_seed(dim)
    x = (torch.randn(batch, seq, heads, dim * (2 if every_other else 1)) * 2).bfloat16().transpose(1, 2)
    x = x[..., ::2] if every_other else x  # strided either way, as after a projection
    x[0, 0, 0, :2] = torch.tensor([1e38, -3e-39])  # overflow to inf in a product, and a subnormal
    cos, sin = rope_tables(torch.randint(0, 3000, (batch, seq)), dim, 1e4, torch.bfloat16)
    out = kernels.rope_bf16(x, cos, sin)
    assert out.is_contiguous() and torch.equal(out, apply_rope(x, cos, sin))
    with pytest.raises(RuntimeError, match="cos/sin"):
        kernels.rope_bf16(x, cos[:, :, :-2], sin[:, :, :-2])


def test_load_fuses_norms_and_rope(make_checkpoint) -> None:  # noqa: ANN001
    path = make_checkpoint(num_key_value_heads=2)
    fast = looplm.load(path, dtype="bfloat16")
    layers = fast.config.num_hidden_layers
    assert fast.kernels["norms"] == 4 * layers + 1  # sandwich norms + the final norm
    assert fast.model.layers[0].self_attn.rope_kernel is not None
    assert looplm.load(path, dtype="bfloat16", kernels="torch").model.norm.kernel is None
    # Training a kernel model stays on eager ops (autograd): the norm's output has a grad_fn.
    x = torch.randn(2, fast.config.hidden_size, dtype=torch.bfloat16)
    assert fast.model.norm(x).grad_fn is not None


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


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (8, 2, 24), (4, 2, 64), (4, 1, 128), (2, 2, 200)])
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


def test_decode_attention_with_sharp_scores(variant: str) -> None:
    """Large score gaps: most weights underflow to 0 and one or two dominate (the vectorised
    exp's range reduction and underflow)."""
    generator = torch.Generator().manual_seed(11)
    keys = [torch.randn(2, 2, 300, 128, generator=generator).bfloat16()]
    values = [torch.randn(2, 2, 300, 128, generator=generator).bfloat16()]
    q = (torch.randn(2, 4, 1, 128, generator=generator) * 40).bfloat16()
    ours = kernels.decode_attention_bf16(q, keys, values, None)
    exact = reference_attention(q, keys, values, None)
    assert (ours.double() - exact).abs().max() <= 2**-7 * exact.abs().max() + 1e-3


@pytest.mark.parametrize("view", [False, True])
def test_decode_attention_append_writes_the_cache_then_attends(variant: str, view: bool) -> None:
    """The full cache's decode step in one call: the new K/V land in their slot and position
    and nowhere else, and the output is the same bits as a write followed by the attention.
    `view`: the cache is the first rows of a larger batch buffer, as the server's batch uses it."""
    generator = torch.Generator().manual_seed(5)
    slots, batch, kv_heads, max_len, dim, position = 3, 2, 2, 20, 64, 11
    rows = batch + 2 if view else batch
    all_keys = torch.randn(slots, rows, kv_heads, max_len, dim, generator=generator).bfloat16()
    all_values = torch.randn(slots, rows, kv_heads, max_len, dim, generator=generator).bfloat16()
    keys, values = all_keys[:, :batch], all_values[:, :batch]
    before_keys, before_values = all_keys.clone(), all_values.clone()
    expected_keys, expected_values = keys.clone(), values.clone()
    q = torch.randn(batch, 4, 1, dim, generator=generator).bfloat16()
    k, v = (torch.randn(batch, kv_heads, 1, dim, generator=generator).bfloat16() for _ in range(2))
    mask = torch.rand(batch, 1, 1, position + 1, generator=generator) > 0.3
    mask[..., -1] = True
    out = kernels.decode_attention_append_bf16(q, k, v, keys, values, 1, position, mask)
    expected_keys[1, :, :, position], expected_values[1, :, :, position] = k[:, :, 0], v[:, :, 0]
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert torch.equal(all_keys[:, batch:], before_keys[:, batch:])  # the larger buffer's other rows
    assert torch.equal(all_values[:, batch:], before_values[:, batch:])
    reference = kernels.decode_attention_bf16(q, [expected_keys[1, :, :, : position + 1]],
                                              [expected_values[1, :, :, : position + 1]], mask)
    assert torch.equal(out, reference)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.decode_attention_append_bf16(q, k, v, keys, values, 1, max_len, None)
    with pytest.raises(RuntimeError, match="k, v must be"):
        kernels.decode_attention_append_bf16(q, k[:1], v[:1], keys, values, 1, position, None)


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


def test_int8_prefill_follows_the_cpu_route(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(), dtype="bfloat16", quant="int8")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.prefill_route == choose_prefill_route(cpu_path)
    x = torch.randn(2, 12, layer.in_features).bfloat16()  # 24 rows: prefill
    exact = (x.double() @ layer.dequantized_weight().double().T)
    with torch.inference_mode():
        for route in ("bf16", "fp32"):
            layer.prefill_route = route
            out = layer(x)
            assert out.dtype == torch.bfloat16 and out.shape == (2, 12, layer.out_features)
            assert (out.double() - exact).abs().max() <= exact.abs().max() * 2**-7, route


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


def test_an_unusable_kernel_cache_falls_back_to_torch_ops(tmp_path) -> None:  # noqa: ANN001
    """A cache path that cannot be created (here: below a regular file; the same path as a
    read-only home) is a build failure like any other: loading warns once and uses torch ops,
    `python -m looplm.kernels` prints one error line."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "LOOPLM_KERNEL_CACHE": str(blocker / "kernels")}
    code = "import looplm; print(looplm.load(None).kernels)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "None"  # no looplm kernels
    assert "cannot create the kernel cache" in proc.stderr and "LOOPLM_KERNEL_CACHE" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "looplm.kernels"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: cannot create")


# -- integer dot-product kernels (csrc/qdot.cpp) ---------------------------------------------------


def reference_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization in torch, same fp32 operations: blocks of 32,
    xs = max|x| / 127, xq = round_half_even(x * (127 / max|x|)), zero-padded to a multiple of 128."""
    rows, k = x.shape
    kp = -(-k // 128) * 128
    xf = torch.zeros(rows, kp)
    xf[:, :k] = x.float()
    blocks = xf.view(rows, kp // 32, 32)
    amax = blocks.abs().amax(-1)
    # a tensor / tensor division: `127.0 / amax` would multiply by a rounded reciprocal
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv[..., None])
    return q.to(torch.int8).view(rows, kp), amax / 127, q.sum(-1).to(torch.int32)


def dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    """fp64 [M, K]: the activations the integer kernels actually multiply by."""
    q, scale, _ = reference_activations(x)
    return (q.double().view(x.shape[0], -1, 32) * scale.double()[..., None]).view(x.shape[0], -1)[:, : x.shape[1]]


@pytest.mark.parametrize("in_features", [32, 64, 200, 2048])
def test_activation_quantization_is_exactly_the_reference(in_features: int) -> None:
    generator = torch.Generator().manual_seed(in_features)
    x = (torch.randn(64, in_features, generator=generator) * torch.rand(64, 1, generator=generator) * 4).bfloat16()
    x[1] = 0  # an all-zero row: scale 0, q 0
    x[2, :32] = torch.tensor([0.5, -0.5] * 16).bfloat16()  # exact halves round to even
    q, scale, sums = (torch.cat(parts) for parts in zip(*(kernels.quantize_activations(r) for r in x.split(8))))
    ref_q, ref_scale, ref_sums = reference_activations(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale) and torch.equal(sums, ref_sums)
    assert int(q.abs().max()) <= 127
    assert (dequantized_activations(x) - x.double()).abs().max() <= x.double().abs().max() / 254 + 1e-12


def check_dot_kernel(ours: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, plain: torch.Tensor) -> None:
    """Tight against the fp64 product of the same quantized values (fp32 accumulation error
    only), loose against the product with unquantized activations."""
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    assert ((ours.double() - exact).abs() <= 2e-6 * magnitude + 1e-9).all()
    assert (ours.double() - plain).norm() <= 0.02 * plain.norm()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("in_features", [32, 64, 96, 200, 2048, 5632])  # full chunks, 32-tails, odd tails
def test_int8_dot_kernel_matches_reference(variant: str, rows: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(rows * 7 + in_features)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    q = torch.randint(-127, 128, (40, in_features), generator=generator, dtype=torch.int8)
    scale = torch.rand(40, generator=generator) * 0.01
    ours = kernels.int8_dot_linear(x, q, scale, fp32_out=True)
    xd, w = dequantized_activations(x), q.double() * scale.double()[:, None]
    magnitude = (xd.abs() @ (q.double().abs() + 128).T) * scale.double()  # the kernel's +128 offset included
    check_dot_kernel(ours, xd @ w.T, magnitude, x.double() @ w.T)
    bf16 = kernels.int8_dot_linear(x, q, scale)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, ours.bfloat16())


@pytest.mark.skipif(cpu_path != "avx512bf16", reason="the weight-row passes are the VNNI int8 kernel's")
def test_int8_dot_kernel_gives_the_same_bits_for_every_weight_rows_per_pass() -> None:
    """3-8 activation rows may take 2-4 weight rows per pass; each output sums in the same order
    as with one, so the results are identical, leftover weight rows and 64-column tails included."""
    try:
        for rows in range(3, 9):
            for out_features, in_features in [(41, 200), (43, 96), (5, 2048)]:
                generator = torch.Generator().manual_seed(rows * 100 + out_features)
                x = torch.randn(rows, in_features, generator=generator).bfloat16()
                q = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
                scale = torch.rand(out_features, generator=generator) * 0.01
                results = []
                for per_pass in (1, 2, 3, 4, 0):
                    kernels.set_int8_rows_per_pass(per_pass)
                    results.append(kernels.int8_dot_linear(x, q, scale, fp32_out=True))
                assert all(torch.equal(results[0], other) for other in results[1:]), (rows, out_features)
    finally:
        kernels.set_int8_rows_per_pass(0)
    with pytest.raises(RuntimeError, match="0 .automatic. to 4"):
        kernels.set_int8_rows_per_pass(5)


def int4_weights(out_features: int, in_features: int, group: int, seed: int):  # noqa: ANN201
    from looplm.quant.kernels import pack_int4_looplm, quantize_int4

    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator) * 0.05 + 0.01
    q, scale, low = quantize_int4(w, group)
    dense = dequantize(q, scale.half(), low.half(), group)  # the layout holds fp16 scales and mins
    return pack_int4_looplm(q, scale, low, group), dense


def dequantize(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    return (q.double().view(n, -1, group) * scale.double()[..., None] + low.double()[..., None]).view(n, k)


INT4_SHAPES = [(group, k) for group in (32, 64, 128, 256) for k in (96, 320, 384, 2048, 5632) if k % group == 0]


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("group,in_features", INT4_SHAPES)  # 96, 320: padded to 128s
def test_int4_dot_kernel_matches_reference(variant: str, rows: int, group: int, in_features: int) -> None:
    out_features = 40 if rows % 2 else 48  # a partial last tile of 16 rows, and whole tiles
    (packed, scales, mins), w = int4_weights(out_features, in_features, group, rows + group + in_features)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    ours = kernels.int4_dot_linear(x, packed, scales, mins, group, out_features, fp32_out=True)
    xd = dequantized_activations(x)
    check_dot_kernel(ours, xd @ w.T, xd.abs() @ w.abs().T, x.double() @ w.T)
    assert torch.equal(kernels.int4_dot_linear(x, packed, scales, mins, group, out_features), ours.bfloat16())


def test_int4_kernels_reject_bad_input() -> None:
    (packed, scales, mins), _ = int4_weights(16, 256, 64, 0)
    x = torch.randn(1, 256).bfloat16()
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        kernels.int4_dot_linear(torch.randn(9, 256).bfloat16(), packed, scales, mins, 64, 16)
    with pytest.raises(RuntimeError, match="group size"):
        kernels.int4_dot_linear(x, packed, scales, mins, 48, 16)
    with pytest.raises(RuntimeError, match="packed width"):
        kernels.int4_dot_linear(torch.randn(1, 512).bfloat16(), packed, scales, mins, 64, 16)
    with pytest.raises(RuntimeError, match="scales and mins"):
        kernels.int4_dot_linear(x, packed, scales[:, :2].contiguous(), mins, 64, 16)
    with pytest.raises(RuntimeError, match="packed weight"):  # 17 rows need two tiles
        kernels.int4_dot_linear(x, packed, scales, mins, 64, 17)
    with pytest.raises(RuntimeError, match="packed weight"):
        kernels.int4_dequantize(packed, scales, mins, 64, 256, 0)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        kernels.int8_dot_linear(torch.randn(9, 16).bfloat16(), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4))


def test_weight_prefetch_changes_no_result(variant: str) -> None:
    """Prefetching (the AVX2 bf16 GEMV's) only moves weights into cache earlier: with it off
    the kernel returns the same bits. Rows of 11 KiB, so prefetches run past rows and past
    the matrix."""
    x = torch.randn(2, 5632).bfloat16()
    w = torch.randn(64, 5632).bfloat16()

    def outputs() -> list[torch.Tensor]:
        return [kernels.skinny_linear_bf16(x, w), kernels.skinny_linear_bf16(x[:1], w)]

    on = outputs()
    try:
        kernels.set_prefetch_bytes(0)
        off = outputs()
    finally:
        kernels.set_prefetch_bytes(16384)
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
    with pytest.raises(RuntimeError, match="0 \\(off\\) to 1 MiB"):
        kernels.set_prefetch_bytes(-1)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("fp32_out", [False, True])
def test_int4_dequantize_matches_reference(variant: str, group: int, fp32_out: bool) -> None:
    from looplm.quant.kernels import unpack_int4_looplm

    for in_features in (256, 768):
        (packed, scales, mins), w = int4_weights(24, in_features, group, group)  # 1.5 tiles of 16 rows
        ours = kernels.int4_dequantize(packed, scales, mins, group, in_features, 24, fp32_out=fp32_out)
        assert ours.dtype == (torch.float32 if fp32_out else torch.bfloat16) and ours.shape == (24, in_features)
        # q * s + m in fp32 (rounding error relative to the larger of the two terms), then bf16
        q, scale, low = unpack_int4_looplm(packed, scales, mins, (24, in_features), group)
        expand = lambda t: t.double().repeat_interleave(group, dim=1)  # noqa: E731
        fp32_error = (q.double() * expand(scale)).abs() * 2**-22 + expand(low).abs() * 2**-22
        bound = fp32_error + (0 if fp32_out else w.abs() * 2**-8)
        assert ((ours.double() - w).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, 8, 17])  # kernel rows and a prefill
@pytest.mark.parametrize("route", ["bf16", "fp32"])
def test_int4_module_in_looplm_layout(rows: int, route: str) -> None:
    from looplm.quant import Int4Linear
    from looplm.quant.kernels import dequantize_int4, quantize_int4

    torch.manual_seed(3)
    w = torch.randn(56, 192) * 0.05  # 3.5 tiles of 16 rows
    q, scale, low = quantize_int4(w, 64)
    layer = Int4Linear(q, scale, low, 64, None, torch.bfloat16, layout="looplm")
    expected_w = dequantize(q, scale.half(), low.half(), 64)
    assert torch.equal(layer.dequantized_weight(), dequantize_int4(q, scale.half(), low.half(), 64, torch.float32))
    x = torch.randn(2, rows, 192).bfloat16()
    fallback = layer(x)  # no kernels attached: dequantize + F.linear in torch
    layer.cpu_kernels, layer.prefill_route = kernels, route
    with torch.inference_mode():
        ours = layer(x)
    exact = x.double() @ expected_w.T
    assert ours.shape == (2, rows, 56) and ours.dtype == torch.bfloat16
    assert (ours.double() - exact).norm() <= 0.02 * exact.norm()
    assert (fallback.double() - exact).norm() <= 0.01 * exact.norm()


class _CountingKernels:
    """looplm's kernel module with its calls counted by name."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str):  # noqa: ANN204
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls.append(name)
            return getattr(self.inner, name)(*args, **kwargs)
        return call


def test_prompts_on_the_fp32_route_run_the_integer_kernels_in_row_chunks(make_checkpoint,  # noqa: ANN001
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AVX-512 BF16, int8 prompts up to INT8_CHUNKED_MAX_ROWS rows and int4 prompts of
    any length run the decode kernels in calls of 8 rows (each row's output as decoding it alone
    gives, up to the kernel's summation order)."""
    from looplm.quant import linear as quant_linear

    fp32_gemms: list[int] = []
    real_gemm = quant_linear.linear_fp32
    monkeypatch.setattr(quant_linear, "linear_fp32", lambda x, w: (fp32_gemms.append(x.shape[0]), real_gemm(x, w))[1])
    monkeypatch.setattr(quant_linear, "INT8_CHUNKED_MAX_ROWS", 32)
    path = make_checkpoint()
    int8 = looplm.load(path, dtype="bfloat16", quant="int8").model.layers[0].mlp.up_proj
    int4 = looplm.load(path, dtype="bfloat16", quant="int4", group_size=32).model.layers[0].mlp.up_proj
    int4.cpu_kernels = counting = _CountingKernels(kernels)
    with torch.inference_mode():
        for layer in (int8, int4):
            layer.prefill_route = "fp32"
            x = torch.randn(30, layer.in_features).bfloat16()
            alone = torch.cat([layer(row[None]) for row in x])  # decode's kernel, one row a call
            together = layer(x)
            assert (together.float() - alone.float()).abs().max() <= alone.float().abs().max() * 2**-7
        assert not fp32_gemms
        int8(torch.randn(33, int8.in_features).bfloat16())  # past the int8 limit: the fp32 GEMM
        assert fp32_gemms == [33]
        int4(torch.randn(300, int4.in_features).bfloat16())
        # 30 rows one by one, 30 together (4 calls), 300 rows (38 calls): never a dequantize
        assert "int4_dequantize" not in counting.calls and counting.calls.count("int4_dot_linear") == 30 + 4 + 38
        int4.prefill_route = "bf16"  # CPUs with AVX-512 BF16: dequantize once, one bf16 GEMM
        int4(torch.randn(9, int4.in_features).bfloat16())
        assert counting.calls[-1] == "int4_dequantize"


def test_quantized_models_use_the_integer_kernels(make_checkpoint) -> None:  # noqa: ANN001
    from looplm.quant.linear import Int4Linear, Int8Linear

    path = make_checkpoint()
    int4 = looplm.load(path, dtype="bfloat16", quant="int4", group_size=32)
    layer = int4.model.layers[0].mlp.up_proj
    assert isinstance(layer, Int4Linear) and layer.layout == "looplm" and layer.cpu_kernels is kernels
    assert int4.kernels["int4_linears"] == 7 * int4.config.num_hidden_layers
    plain = looplm.load(path, dtype="bfloat16", quant="int4", group_size=32, kernels="torch")
    assert plain.model.layers[0].mlp.up_proj.layout == "torch" and plain.kernels is None
    int8 = looplm.load(path, dtype="bfloat16", quant="int8")
    assert int8.model.layers[0].mlp.up_proj.decode_kernel is kernels.int8_dot_linear
    assert isinstance(int8.model.layers[0].mlp.up_proj, Int8Linear)
    prompt = torch.tensor([[5, 9, 2, 33, 7, 1]])
    with torch.inference_mode():  # the quantized decode stays close to the torch route's logits
        for fast, slow in ((int4, plain), (int8, looplm.load(path, dtype="bfloat16", quant="int8", kernels="torch"))):
            a, b = fast.forward_steps(prompt[:, :4]).logits.float(), slow.forward_steps(prompt[:, :4]).logits.float()
            assert (a - b).norm() <= 0.05 * b.norm()


def test_quantize_model_on_a_kernel_model_uses_the_integer_kernels(make_checkpoint) -> None:  # noqa: ANN001
    from looplm.quant import quantize_model

    model = looplm.load(make_checkpoint(), dtype="bfloat16")
    quantize_model(model, 4, group_size=32)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.layout == "looplm" and layer.cpu_kernels is kernels
    assert model.kernels["int4_linears"] == 7 * model.config.num_hidden_layers


def test_fp32_prefill_gemm_matches_fp32_linear(monkeypatch) -> None:  # noqa: ANN001
    from looplm.kernels import fp32_gemm

    x = torch.randn(2, 37, 96).bfloat16()
    w = torch.randn(80, 96).bfloat16()
    expected = F.linear(x.double(), w.double())
    ours = fp32_gemm.upcast_linear(x, w)
    assert ours.dtype == torch.bfloat16 and ours.shape == (2, 37, 80)
    assert ((ours.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-3).all()  # bf16 rounding of the result
    monkeypatch.setattr(fp32_gemm, "onednn_linear_available", lambda: False)  # torch builds without oneDNN
    assert torch.equal(fp32_gemm.upcast_linear(x, w), F.linear(x.float(), w.float()).bfloat16())


def test_fp32_weight_buffer_is_reused_per_thread(monkeypatch) -> None:  # noqa: ANN001
    import threading

    from looplm.kernels import fp32_gemm

    big = fp32_gemm.fp32_weight_buffer((64, 32))
    small = fp32_gemm.fp32_weight_buffer((16, 8))
    assert small.shape == (16, 8) and small.data_ptr() == big.data_ptr()  # the same memory, no new allocation
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(fp32_gemm.fp32_weight_buffer((16, 8))))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != small.data_ptr()  # another thread never writes into this one's buffer
    monkeypatch.setattr(fp32_gemm, "MAX_KEPT_ELEMENTS", 100)
    assert fp32_gemm.fp32_weight_buffer((64, 32)).data_ptr() != big.data_ptr()  # too large to keep: a one-off


def test_int4_dequantize_into_a_given_buffer() -> None:
    (packed, scales, mins), _ = int4_weights(48, 384, 128, 5)
    fresh = kernels.int4_dequantize(packed, scales, mins, 128, 384, 48, fp32_out=True)
    out = torch.full((48, 384), float("nan"))
    assert kernels.int4_dequantize(packed, scales, mins, 128, 384, 48, fp32_out=True, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, fresh)
    with pytest.raises(RuntimeError, match="out must be"):
        kernels.int4_dequantize(packed, scales, mins, 128, 384, 48, fp32_out=True, out=torch.empty(48, 384).bfloat16())
    with pytest.raises(RuntimeError, match="out must be"):
        kernels.int4_dequantize(packed, scales, mins, 128, 384, 48, fp32_out=True, out=torch.empty(48, 383))


def test_fp32_prefill_gemm_across_inference_and_grad_modes() -> None:
    from looplm.kernels.fp32_gemm import upcast_linear

    x, w = torch.randn(20, 64).bfloat16(), torch.randn(5000, 64).bfloat16()  # a buffer larger than other tests'
    with torch.inference_mode():
        first = upcast_linear(x, w)  # the buffer is made here
    with torch.no_grad():
        assert torch.equal(upcast_linear(x, w), first)  # and written to outside inference mode


def _without_plans(model):  # noqa: ANN001, ANN202
    for layer in model.model.layers:
        layer.decode_plan = None
    return model


def _modules_only(model):  # noqa: ANN001, ANN202
    for layer in _without_plans(model).model.layers:
        layer.self_attn.qkv_group = None
        layer.mlp.gate_up_group = None
    return model


def _greedy_logits(model, prompt: torch.Tensor, tokens: int, **options: object) -> list[torch.Tensor]:  # noqa: ANN001
    from looplm.generate import stream_generate

    seen = []
    original = model.lm_head.forward
    model.lm_head.forward = lambda x: seen.append(original(x).clone()) or seen[-1]
    with torch.inference_mode():
        for _ in stream_generate(model, prompt, tokens, eos_token_ids=[], **options):
            pass
    return seen


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_shared_input_groups_decode_the_same_bits(make_checkpoint, quant: str | None) -> None:  # noqa: ANN001
    """q/k/v and gate/up as groups: decode calls the same kernels with the same inputs, so
    every logit of a greedy generation is bit-identical to the modules' path."""
    path = make_checkpoint(num_key_value_heads=2)  # grouped-query: k/v narrower than q
    grouped = _without_plans(looplm.load(path, dtype="bfloat16", quant=quant, group_size=32))
    assert grouped.kernels["shared_input_groups"] == 2 * grouped.config.num_hidden_layers
    plain = _modules_only(looplm.load(path, dtype="bfloat16", quant=quant, group_size=32))
    prompt = torch.tensor([[5, 9, 2, 33, 7, 1]])
    ours, reference = _greedy_logits(grouped, prompt, 5), _greedy_logits(plain, prompt, 5)
    assert len(ours) == len(reference) >= 5
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_shared_input_group_steps_aside(make_checkpoint) -> None:  # noqa: ANN001
    from looplm.kernels.shared_input import SharedInputGroup
    from looplm.quant import quantize_model

    model = looplm.load(make_checkpoint(), dtype="bfloat16")
    attention = model.model.layers[0].self_attn
    group = attention.qkv_group
    x = torch.randn(1, 1, model.config.hidden_size).bfloat16()
    with torch.inference_mode():
        assert group(x) is not None and group(x.float()) is None  # fp32 input: the modules run
        assert group(x.expand(1, 9, -1)) is None  # prefill (more than 8 rows): the modules run
    with torch.enable_grad():
        assert group(x) is None  # autograd on: the modules run
    attention.k_proj.bias = torch.nn.Parameter(torch.zeros(attention.k_proj.out_features).bfloat16())
    assert SharedInputGroup.build(attention, ("q_proj", "k_proj", "v_proj"), kernels) is None  # a bias
    quantize_model(model, 8)  # swaps the projections and rebuilds every group for the new modules
    assert model.model.layers[1].self_attn.qkv_group.kind == "int8"
    with torch.inference_mode():
        assert group(x) is None  # the old group sees its modules were replaced and steps aside


DECODE_PLAN_CASES = {
    "bf16 gqa": ({"num_key_value_heads": 2}, None, {}),
    "int8": ({}, "int8", {}),
    "int4 gqa": ({"num_key_value_heads": 1}, "int4", {}),
    "no sandwich norm": ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None, {}),
    "shared kv": ({}, None, {"kv_mode": "shared"}),
    "early exit skips rows": ({}, "int4", {"exit_threshold": 0.5, "skip_compute": True}),
    "two steps": ({}, None, {"steps": 2}),
}


def config_layers(model) -> int:  # noqa: ANN001
    return model.config.num_hidden_layers


@pytest.mark.parametrize("case", list(DECODE_PLAN_CASES))
def test_decode_plans_give_the_same_bits(make_checkpoint, case: str) -> None:  # noqa: ANN001
    """A layer's decode plan makes the modules' kernel calls in the same order: every logit of a
    greedy generation (batched, left-padded) is bit-identical to the modules' path."""
    overrides, quant, options = DECODE_PLAN_CASES[case]
    path = make_checkpoint(**overrides)
    planned = looplm.load(path, dtype="bfloat16", quant=quant, group_size=32)
    assert planned.kernels["decode_plans"] == planned.config.num_hidden_layers
    plain = _modules_only(looplm.load(path, dtype="bfloat16", quant=quant, group_size=32))
    prompts = [[5, 9, 2, 33, 7, 1], [8, 4, 11]]  # rows of different lengths: left padding and a mask
    ran = []
    for layer in planned.model.layers:
        plan = layer.decode_plan
        layer.decode_plan = lambda *args, plan=plan: ran.append(plan(*args)) or ran[-1]
    ours, reference = _greedy_logits(planned, prompts, 5, **options), _greedy_logits(plain, prompts, 5, **options)
    assert sum(out is not None for out in ran) >= 4 * config_layers(planned)  # the plans ran every decode pass
    assert len(ours) == len(reference) >= 5
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_decode_plan_follows_weights_changed_after_it_was_built(make_checkpoint, quant: str | None) -> None:  # noqa: ANN001
    """The one-call pass holds the layer's tensors (and an fp32 copy of an int8 scale): a weight
    replaced or edited in place later must be what the next token uses."""
    path = make_checkpoint()
    planned = looplm.load(path, dtype="bfloat16", quant=quant, group_size=32)
    plain = _modules_only(looplm.load(path, dtype="bfloat16", quant=quant, group_size=32))
    prompt = torch.tensor([[5, 9, 2, 33, 7, 1]])
    _greedy_logits(planned, prompt, 2)  # the plans have run (and hold their tensors)
    for model in (planned, plain):
        layer = model.model.layers[0]
        with torch.no_grad():
            if quant == "int8":
                layer.mlp.down_proj.scale.mul_(1.5)  # in place: the kernel's fp32 copy is stale
            elif quant == "int4":
                buffers = layer.self_attn.q_proj._buffers
                buffers["scales_looplm"] = buffers["scales_looplm"] * 1.5  # replaced
            else:
                layer.self_attn.o_proj.weight = torch.nn.Parameter(layer.self_attn.o_proj.weight * 1.5)
    ours, reference = _greedy_logits(planned, prompt, 4), _greedy_logits(plain, prompt, 4)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_decode_plan_on_a_cache_over_the_first_rows_of_a_larger_buffer(make_checkpoint) -> None:  # noqa: ANN001
    """The server's batch decodes into `KVCache.over(keys[:, :used], ...)`: a view whose rows are
    strided. The one-call pass writes and reads it in place, the same bits as the modules."""
    from looplm.cache import KVCache
    from looplm.exit import LastPolicy

    path = make_checkpoint(num_key_value_heads=2)
    planned = looplm.load(path, dtype="bfloat16")
    plain = _modules_only(looplm.load(path, dtype="bfloat16"))
    config, steps = planned.config, planned.config.total_ut_steps
    prompt = torch.tensor([[5, 9, 2, 33], [8, 4, 11, 7]])
    positions = torch.arange(4).expand(2, 4)
    calls = []
    for layer in planned.model.layers:  # count the one-call passes
        native = layer.decode_plan.native
        layer.decode_plan.native = SimpleNamespace(forward=lambda *args, native=native: calls.append(1) or native.forward(*args))
    logits, buffers = [], []
    for model in (planned, plain):
        big = model.make_cache(3, 12)  # room for three rows; the batch uses the first two
        cache = KVCache.over(big.keys[:, :2], big.values[:, :2], steps, 0)
        with torch.inference_mode():
            model.run_steps(prompt, positions, None, cache)
            for token in (3, 17, 6):
                step_logits, _ = model.decode_step(torch.tensor([[token], [token]]), torch.tensor([[cache.length]] * 2),
                                                   None, cache, steps, LastPolicy())
                logits.append(step_logits)
        buffers.append(big)
        assert cache.length == 7 and not big.keys[:, 2].any()  # the third row was never written
    assert all(torch.equal(a, b) for a, b in zip(logits[:3], logits[3:], strict=True))
    assert torch.equal(buffers[0].keys, buffers[1].keys) and torch.equal(buffers[0].values, buffers[1].values)
    assert len(calls) == 3 * steps * config.num_hidden_layers  # every decode pass took the one call


def test_decode_plan_steps_aside(make_checkpoint) -> None:  # noqa: ANN001
    from looplm.cache import KVCache
    from looplm.kernels.decode_layer import LayerDecodePlan
    from looplm.models.ouro import AttentionBias
    from looplm.quant import quantize_model

    model = looplm.load(make_checkpoint(), dtype="bfloat16")
    config = model.config
    layer = model.model.layers[0]
    plan = layer.decode_plan
    cache = KVCache(config.total_ut_steps, config.num_hidden_layers, 1, config.num_key_value_heads, 16,
                    config.head_dim, torch.bfloat16)
    x = torch.randn(1, 1, config.hidden_size).bfloat16()
    cos = sin = torch.ones(1, 1, config.head_dim).bfloat16()
    bias = AttentionBias(None, False)
    with torch.inference_mode():
        assert plan(x, cos, sin, bias, cache, 0) is not None
        assert plan(x, cos, sin, bias, None, 0) is None  # no cache
        assert plan(x.float(), cos, sin, bias, cache, 0) is None  # fp32: the modules run
        assert plan(x.expand(1, 2, -1), cos, sin, bias, cache, 0) is None  # more than one new token
    with torch.enable_grad():
        assert plan(x, cos, sin, bias, cache, 0) is None  # autograd on
    norm = layer.input_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())  # a new weight tensor: the plan's is stale
    with torch.inference_mode():
        assert plan(x, cos, sin, bias, cache, 0) is None
    layer.decode_plan = plan = LayerDecodePlan.build(layer, kernels)
    layer.post_attention_layernorm_2 = torch.nn.Identity()  # a swapped submodule
    with torch.inference_mode():
        assert plan(x, cos, sin, bias, cache, 0) is None
    layer.mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(config.hidden_size).bfloat16())
    assert LayerDecodePlan.build(layer, kernels) is None  # a projection without a kernel path
    quantize_model(model, 4, group_size=32)  # swaps projections: plans are rebuilt for the new modules
    assert model.kernels["decode_plans"] == config.num_hidden_layers - 1  # (layer 0 has a bias now)
    assert model.model.layers[1].decode_plan.qkv.kind == "int4"
