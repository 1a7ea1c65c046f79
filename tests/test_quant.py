"""Weight-only quantization (looplm.quant): the modules, load(quant=...), the checkpoint format
written by `looplm quantize`, and its errors. Tiny random models only; CPU only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import looplm
from looplm.cli import app
from looplm.errors import CheckpointError, QuantizationError
from looplm.quant import Int4Linear, Int8Linear, QuantSpec, export, quantize_model
from looplm.quant.export import save_quantized
from looplm.quant.kernels import (
    dequantize_int4,
    dequantize_int8,
    pack_int4_looplm,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_int4_looplm,
    unpack_nibbles,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _plain_torch_linears(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave the unquantized linears to torch: these tests are about the quantized ones."""
    monkeypatch.setenv("LOOPLM_KERNELS", "torch")


def _reference_int4(weight: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight torch's int4 kernel multiplies by: (q - 8) * scale + zero, scale/zero in `dtype`."""
    q, scale, low = quantize_int4(weight, group)
    zero = (low + 8 * scale).to(dtype).float()
    scale = scale.to(dtype).float()
    n, k = q.shape
    return ((q.view(n, k // group, group).float() - 8) * scale[..., None] + zero[..., None]).view(n, k)


# -- kernels and modules -------------------------------------------------------------------------


def test_int8_quantization_error_is_at_most_half_a_step() -> None:
    w = torch.randn(48, 80)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert ((dequantize_int8(q, scale, torch.float32) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_quantizing_leaves_the_float_weight_alone() -> None:
    w = torch.randn(40, 64)
    before = w.clone()
    quantize_int8(w)
    quantize_int4(w, 32)
    assert torch.equal(w, before)


def test_int4_quantization_error_and_nibble_round_trip() -> None:
    w = torch.randn(32, 128)
    w[0, :32] = 0.25  # a constant group is reproduced exactly
    q, scale, low = quantize_int4(w, 32)
    assert int(q.max()) <= 15
    deq = dequantize_int4(q, scale, low, 32, torch.float32)
    step = scale.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(deq[0, :32], w[0, :32])
    packed = pack_nibbles(q)
    assert packed.shape == (32, 64) and torch.equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("rows", [1, 3, 40])  # fused kernel (<= 8 rows) and cast + GEMM
def test_int8_linear_equals_dequantized_matmul(rows: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, scale = quantize_int8(w)
    x = torch.randn(2, rows, 64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        layer = Int8Linear(q, scale, None, dtype)
        expected = F.linear(x.to(dtype).float(), dequantize_int8(q, scale.to(dtype).float(), torch.float32))
        got = layer(x.to(dtype))
        assert got.dtype == dtype and got.shape == (2, rows, 96)
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("out_features", [64, 48])  # the CPU layout packs 64 rows per block; 48 is a tail
def test_int4_linear_equals_dequantized_matmul(group: int, rows: int, out_features: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(out_features, 256)
    q, scale, low = quantize_int4(w, group)
    x = torch.randn(rows, 256)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        layer = Int4Linear(q, scale, low, group, None, dtype)
        assert layer.fused
        expected = F.linear(x.to(dtype).float(), _reference_int4(w, group, dtype))
        torch.testing.assert_close(layer(x.to(dtype)).float(), expected, atol=tol, rtol=tol)


def test_int4_linear_fallback_for_shapes_the_cpu_kernel_rejects() -> None:
    w = torch.randn(40, 64)  # 40 output features: not a multiple of 16
    q, scale, low = quantize_int4(w, 32)
    layer = Int4Linear(q, scale, low, 32, None, torch.float32)
    assert not layer.fused
    x = torch.randn(3, 64)
    expected = F.linear(x, dequantize_int4(q, scale, low, 32, torch.float32))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_features", [24, 32])  # a partial last tile of 16 rows, and whole tiles
@pytest.mark.parametrize("in_features,group", [(256, 64), (96, 32), (384, 128), (512, 256)])
def test_looplm_int4_layout_round_trip(out_features: int, in_features: int, group: int) -> None:
    """looplm's tiled layout (16-row tiles, columns padded to 128) gives back q, scale and min
    exactly (the last two rounded to fp16 once); padding rows and columns are zero."""
    w = torch.randn(out_features, in_features)
    q, scale, low = quantize_int4(w, group)
    packed, scales, mins = pack_int4_looplm(q, scale, low, group)
    padded, tiles = -(-in_features // 128) * 128, -(-out_features // 16)
    assert packed.shape == (tiles, padded * 8) and scales.shape == mins.shape == (tiles, padded // group * 16)
    back_q, back_scale, back_low = unpack_int4_looplm(packed, scales, mins, (out_features, in_features), group)
    assert torch.equal(back_q, q) and torch.equal(back_scale, scale.half()) and torch.equal(back_low, low.half())
    everything, *_ = unpack_int4_looplm(packed, scales, mins, (tiles * 16, padded), group)
    assert not everything[out_features:].any() and not everything[:, in_features:].any()
    assert scales.dtype == mins.dtype == torch.float16  # rounded once: 2^-11 relative
    # tile 0, columns 8..15 (octet 1): row 3's 4 bytes start at 64 + 4 * 3; byte i = column 8 + i | 12 + i << 4
    assert int(packed[0, 64 + 12 + 2]) == int(q[3, 10]) | (int(q[3, 14]) << 4)
    # tile 1 starts Kp * 8 bytes in; row 17 is its row 1; scales: [group, row] per tile
    assert int(packed[1, 4 * 1]) == int(q[17, 0]) | (int(q[17, 4]) << 4)
    assert scales[1, 16 * 1 + 1] == scale[17, 1].half()
    layer = Int4Linear(q, scale, low, group, None, torch.float32, layout="looplm")  # no C++ kernels: torch fallback
    x = torch.randn(3, in_features)
    expected = F.linear(x, dequantize_int4(q, scale.half(), low.half(), group, torch.float32))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# -- whole models ----------------------------------------------------------------------------------


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model.forward_steps(ids).logits.float()


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_only_layer_projections_are_quantized(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(), quant="int4", group_size=32)
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(proj, Int4Linear)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(model.model.early_exit_gate, torch.nn.Linear)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.quantization == QuantSpec(4, 32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_logits_close_to_float(make_checkpoint, dtype: str) -> None:  # noqa: ANN001
    path = make_checkpoint()
    ref = _logits(looplm.load(path, dtype=dtype), IDS)
    got = _logits(looplm.load(path, dtype=dtype, quant="int8"), IDS)
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.03 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantize_model_matches_load_quant(make_checkpoint) -> None:  # noqa: ANN001
    path = make_checkpoint()
    in_place = quantize_model(looplm.load(path, dtype="float32"), 4, 32)
    loaded = looplm.load(path, dtype="float32", quant="int4", group_size=32)
    assert torch.equal(_logits(in_place, IDS), _logits(loaded, IDS))


@pytest.mark.parametrize(("bits", "group"), [(8, 128), (4, 32), (4, 64)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_checkpoint_gives_identical_logits(make_checkpoint, tmp_path: Path, bits: int, group: int, dtype: str) -> None:  # noqa: ANN001, E501
    path = make_checkpoint()
    on_the_fly = looplm.load(path, dtype=dtype, quant=f"int{bits}", group_size=group)
    out = save_quantized(str(path), tmp_path / "q", QuantSpec(bits, group), dtype=dtype)
    saved = looplm.load(out, dtype=dtype)
    assert torch.equal(_logits(saved, IDS), _logits(on_the_fly, IDS))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits
    assert (out / "tokenizer.json").exists() and saved.tokenizer is not None
    tensors = load_file(str(out / "model.safetensors"))
    qweight = tensors["model.layers.0.mlp.down_proj.qweight"]
    assert qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qweight.shape == ((64, 128) if bits == 8 else (64, 64))
    assert "model.layers.0.mlp.down_proj.weight" not in tensors and "lm_head.weight" in tensors


def test_tied_lm_head_stays_tied(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    path = make_checkpoint(tie_word_embeddings=True)
    out = save_quantized(str(path), tmp_path / "q", QuantSpec(8))
    model = looplm.load(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model, IDS), _logits(looplm.load(path, quant="int8"), IDS))


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "group", "message"),
    [("int3", 128, "quant must be one of"), ("int4", 48, "group size must be one of"),
     ("int4", 128, "does not divide model.layers.0.self_attn.q_proj's 64 input features; group size 32 or 64 fits")],
)
def test_bad_settings(make_checkpoint, quant: str, group: int, message: str) -> None:  # noqa: ANN001
    with pytest.raises(QuantizationError, match=message):
        looplm.load(make_checkpoint(), quant=quant, group_size=group)


def _broken_copy(tmp_path: Path, make_checkpoint, edit) -> Path:  # noqa: ANN001
    out = save_quantized(str(make_checkpoint()), tmp_path / "q", QuantSpec(4, 32))
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_quantized_checkpoint_missing_tensor(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    out = _broken_copy(tmp_path, make_checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.mins"))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.mins' missing"):
        looplm.load(out)


def test_quantized_checkpoint_mismatched_tensor(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    def edit(tensors: dict) -> None:
        tensors["model.layers.0.self_attn.k_proj.scales"] = torch.ones(64, 4, dtype=torch.bfloat16)

    with pytest.raises(CheckpointError, match="k_proj.scales' is bfloat16 \\[64, 4\\], the 4-bit format expects float32 \\[64, 2\\]"):
        looplm.load(_broken_copy(tmp_path, make_checkpoint, edit))


def test_quantized_checkpoint_with_float_weights_left_in(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    out = _broken_copy(tmp_path, make_checkpoint, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        looplm.load(out)


def test_quantized_tensors_without_quantization_config_are_rejected(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    out = save_quantized(str(make_checkpoint()), tmp_path / "q", QuantSpec(8))
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected a float type"):
        looplm.load(out)


def test_requantizing_a_quantized_checkpoint_is_refused(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    out = save_quantized(str(make_checkpoint()), tmp_path / "q", QuantSpec(4, 32))
    assert looplm.load(out, quant="int4", group_size=32).quantization == QuantSpec(4, 32)  # same spec: fine
    with pytest.raises(QuantizationError, match="already quantized to int4 \\(group size 32\\)"):
        looplm.load(out, quant="int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        save_quantized(str(out), tmp_path / "again", QuantSpec(8))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_quantized_reports_its_stages(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    """What `looplm quantize` shows on a terminal while a large model is loaded, quantized and written."""
    stages: list[str] = []
    save_quantized(str(make_checkpoint()), tmp_path / "q", QuantSpec(8, 128), report=stages.append)
    projections = 2 * 7  # the small checkpoint's two layers, seven projections each
    assert stages == ["loading", *(f"quantizing {i}/{projections}" for i in range(1, projections + 1)), "writing"]


def test_an_existing_model_is_replaced_only_with_overwrite(make_checkpoint, tmp_path: Path,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_checkpoint()
    out = save_quantized(str(path), tmp_path / "q", QuantSpec(8))
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors.index.json").write_text("{}")  # a stale index would win over new weights
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(QuantizationError, match="already holds model files .*--overwrite replaces them"):
        save_quantized(str(path), out, QuantSpec(4, 32))

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_copy_side_files", interrupted)
    with pytest.raises(KeyboardInterrupt):  # a run stopped while writing leaves the old model as it was
        save_quantized(str(path), out, QuantSpec(4, 32), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # no staging directory left behind
    monkeypatch.undo()

    save_quantized(str(path), out, QuantSpec(4, 32), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model.safetensors.index.json").exists()
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # modes as for any new file, not owner-only
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert looplm.load(out).quantization == QuantSpec(4, 32)


# -- command line ----------------------------------------------------------------------------------


def test_cli_quantize_round_trip(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    path, out = make_checkpoint(), tmp_path / "q8"
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", "-m", str(path), "--bits", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "int8" in result.stderr
    result = runner.invoke(app, ["generate", "hello", "-m", str(out), "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["new_ids"]) == 4
    result = runner.invoke(app, ["generate", "hello", "-m", str(path), "--quant", "int4", "--group-size", "32",
                                 "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--bits", "3"], "bits must be 8 or 4"), (["--bits", "4", "--group-size", "100"], "group size must be one of"),
     (["--bits", "4", "--group-size", "128"], "does not divide"),
     (["--bits", "8", "--group-size", "64"], "--group-size applies to int4")],  # it was ignored
)
def test_cli_quantize_errors_are_one_line(make_checkpoint, tmp_path: Path, args: list[str], message: str) -> None:  # noqa: ANN001, E501
    result = CliRunner().invoke(app, ["quantize", "-m", str(make_checkpoint()), "-o", str(tmp_path / "q"), *args])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1


def test_cli_quantize_refuses_an_empty_output(make_checkpoint) -> None:  # noqa: ANN001
    """-o "" wrote into the current directory."""
    result = CliRunner().invoke(app, ["quantize", "-m", str(make_checkpoint()), "-o", ""])
    assert result.exit_code == 1 and result.stderr == "error: --output is empty; give the directory to write\n"


def test_cli_quantize_to_an_unwritable_place_fails_before_loading(make_checkpoint, tmp_path: Path,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm.quant.export

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(looplm.quant.export, "load", no_load)
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(app, ["quantize", "-m", str(make_checkpoint()), "-o", str(tmp_path / "a-file" / "q")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "cannot write there" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_quantize_that_cannot_write_its_weights_is_one_line(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    """On a full disk, safetensors' own error (not an OSError) escaped as a traceback. A file-size
    limit fails the write the same way."""
    resource = pytest.importorskip("resource")
    path, out = make_checkpoint(), tmp_path / "q"
    limit, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        result = CliRunner().invoke(app, ["quantize", "-m", str(path), "--bits", "8", "-o", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert result.exit_code == 1 and result.stderr == f"error: could not write {out} (File too large)\n", result.output
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # neither the output nor its staging directory


def test_cli_quantize_error_exits_nonzero_without_traceback(make_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    path = _broken_copy(tmp_path, make_checkpoint, lambda t: t.pop("model.layers.0.mlp.gate_proj.qweight"))
    cmd = [sys.executable, "-m", "looplm", "generate", "hi", "-m", str(path), "--max-new-tokens", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "gate_proj.qweight' missing" in errors[0]
    assert "Traceback" not in proc.stderr


def test_int8_on_cuda_warns_that_it_saves_memory_not_time(make_checkpoint) -> None:  # noqa: ANN001
    """Checked on a CPU model with the device argument a GPU load would pass."""
    from looplm.loading import warn_int8_on_cuda

    int8 = looplm.load(make_checkpoint(seed=4), dtype="float32", quant="int8")
    with pytest.warns(UserWarning, match="saves GPU memory but not decode time"):
        assert warn_int8_on_cuda(int8, torch.device("cuda"))
    assert not warn_int8_on_cuda(int8, torch.device("cpu"))
    int4 = looplm.load(make_checkpoint(seed=4), dtype="float32", quant="int4", group_size=32)
    assert not warn_int8_on_cuda(int4, torch.device("cuda"))
