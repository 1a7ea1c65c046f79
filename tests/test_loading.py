"""Loader: layouts, dtypes, and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import looplm
from looplm.devices import resolve_device
from looplm.errors import CheckpointError, ConfigError, HubError


@pytest.fixture
def ckpt(make_checkpoint) -> Path:  # noqa: ANN001
    return make_checkpoint(seed=0, num_key_value_heads=2)


def assert_one_line(exc: BaseException, *needles: str) -> None:
    message = str(exc)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", torch.float32])
def test_loads_every_dtype(ckpt: Path, dtype) -> None:  # noqa: ANN001
    model = looplm.load(ckpt, dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert all(p.dtype == expected for p in model.parameters())
    stored = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(model.state_dict()[name], stored[name].to(expected))


def test_sharded_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    sharded = tmp_path / "sharded"
    shutil.copytree(ckpt, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(sharded / file))
        weight_map.update({k: file for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = looplm.load(ckpt, dtype="float32"), looplm.load(sharded, dtype="float32")
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(a.forward_steps(ids).logits, b.forward_steps(ids).logits)


def test_generation_config_eos_ids_are_all_stop_ids(ckpt: Path) -> None:
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7], "temperature": 0.7}))
    model = looplm.load(ckpt)
    assert set(model.generation_defaults["eos_token_ids"]) >= {0, 2, 7}  # config 2, tokenizer <|im_end|> 2
    assert model.generation_defaults["temperature"] == 0.7


def test_the_end_of_turn_token_stops_where_every_config_names_only_0(make_checkpoint) -> None:  # noqa: ANN001
    """The spec's shipped Ouro configs (config, generation config, tokenizer) all say eos 0, while
    chat turns end with <|im_end|> (2): it is a stop id all the same, or replies run on."""
    path = make_checkpoint(eos_token_id=0)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    model = looplm.load(path)
    assert model.tokenizer.eos_id == 0 and model.tokenizer.end_of_turn_ids == {2}
    assert model.stop_ids == {0, 2}
    assert looplm.load().stop_ids == {0, 2}  # the embedded model's configs name 0 only, too


def test_ignores_rotary_inv_freq(ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, str(ckpt / "model.safetensors"))
    looplm.load(ckpt)


def test_missing_directory() -> None:
    with pytest.raises(CheckpointError) as info:
        looplm.load("./no/such/model")
    assert_one_line(info.value, "no such file or directory")


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "config.json", "not found")


def test_corrupt_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "config.json", "invalid JSON")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model_type": "mamba"}, "not supported"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"hidden_size": -1}, "positive integer"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_config_values(ckpt: Path, change: dict, needle: str) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(change)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, needle)


def test_missing_key_in_config(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "hidden_size")


def test_truncated_safetensors(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "model.safetensors")


def test_garbage_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "model.safetensors", "corrupt")


def test_missing_tensor(ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "missing", "up_proj")


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_tensors_named_in_another_layout(ckpt: Path, prefix: str) -> None:
    """Names without 'model.' (or under 'transformer.') are another layout, not a layer count."""
    weights = {prefix + name.removeprefix("model."): t for name, t in load_file(str(ckpt / "model.safetensors")).items()}
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "no 'model.layers.N.*' tensors", f"found {prefix}")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(ckpt: Path) -> None:
    if not (ckpt / "tokenizer.json").exists():
        pytest.skip("this checkpoint has no tokenizer")
    config = json.loads((ckpt / "config.json").read_text())
    size = looplm.load(ckpt).tokenizer.vocab_size
    weights = load_file(str(ckpt / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            weights[name] = weights[name][: size - 1].clone()
    save_file(weights, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": size - 1}))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, f"the tokenizer has {size} tokens but config.json's vocab_size is {size - 1}")


def test_extra_tensor(ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "says num_hidden_layers 2, the weights hold layers 3 (indices 0-2)")
    del weights["model.layers.2.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "unexpected", "layers.1.mlp.extra")


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("num_hidden_layers", 10**9, "says num_hidden_layers 1000000000, the weights hold layers 2"),  # took minutes
    ("hidden_size", 10**12, "'model.embed_tokens.weight' has shape [300, 64], the config expects [300, 1000000"),
    ("intermediate_size", 10**12, "mlp.gate_proj.weight' has shape"),  # tried to allocate 8e15 bytes
    ("vocab_size", 10**12, "'model.embed_tokens.weight' has shape"),
    ("rope_theta", "x", "'rope_theta' must be a finite number, got 'x'"),
    ("rope_theta", 0, "'rope_theta' must be positive"),
    ("rope_theta", 10**400, "'rope_theta' must be a finite number"),  # float() of it overflows
    ("rms_norm_eps", -1, "'rms_norm_eps' must be positive"),
    ("eos_token_id", "zero", "'eos_token_id' must be a token id or a list of token ids, got 'zero'"),
    ("eos_token_id", "12", "got '12'"),  # became stop ids 1 and 2
    ("eos_token_id", [0.9], "got [0.9]"),
    ("pad_token_id", -1, "'pad_token_id' must be a token id"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("early_exit_threshold", float("nan"), "'early_exit_threshold' must be a finite number"),
])
def test_config_values_are_checked_before_the_model_is_built(ckpt: Path, key: str, value: object,
                                                             needle: str) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises((ConfigError, CheckpointError)) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, needle)


def test_config_and_generation_config_files_that_are_not_utf8_or_hold_bad_values(ckpt: Path) -> None:
    (ckpt / "generation_config.json").write_bytes(b'{"temperature": "\xff"}')
    with pytest.raises(ConfigError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "generation_config.json: not UTF-8 text")
    for bad, needle in (({"eos_token_id": "0"}, "'eos_token_id' must be a token id"),
                        ({"eos_token_id": {"a": 1}}, "'eos_token_id' must be a token id"),
                        ({"temperature": "hot"}, "generation_config.json: temperature must be a finite number >= 0, got 'hot'"),
                        ({"max_new_tokens": 0}, "generation_config.json: max_new_tokens must be a positive integer")):
        (ckpt / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError) as info:
            looplm.load(ckpt)
        assert_one_line(info.value, needle)


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/model.safetensors", ".."])
def test_an_index_cannot_point_outside_the_model_directory(ckpt: Path, shard: str) -> None:
    names = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {name: shard for name in names}}))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, f"weight_map names {shard!r}, not a file in the model directory")


def test_do_sample_false_makes_the_default_greedy(ckpt: Path) -> None:
    """Hugging Face decodes greedily when generation_config.json says do_sample false, whatever
    temperature it names; looplm sampled at that temperature."""
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7, "top_p": 0.9}))
    assert looplm.load(ckpt).generation_defaults["temperature"] == 0.0
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    assert looplm.load(ckpt).generation_defaults["temperature"] == 0.7


def test_shape_mismatch(ckpt: Path) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "model.norm.weight", "[65]", "[64]")


def test_pickle_only_checkpoint_is_refused(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError) as info:
        looplm.load(ckpt)
    assert_one_line(info.value, "pickle", "safetensors")


def test_offline_hub_id_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as info:
        looplm.load("ByteDance/Ouro-1.4B-Thinking")
    assert_one_line(info.value, "ByteDance/Ouro-1.4B-Thinking", "local directory",
                    "(HF_HUB_OFFLINE is set and the model is not in the local hub cache)")


def test_hub_reasons_are_cut_at_a_sentence_and_an_empty_path_is_refused() -> None:
    from looplm.loading import _first_sentence

    text = ("Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
            "outgoing traffic has been disabled. To enable repo look-ups and downloads online, set ...")
    assert _first_sentence(text) == ("Cannot find an appropriate cached snapshot folder for the specified revision "
                                     "on the local disk and outgoing traffic has been disabled")
    long = "word " * 60
    assert _first_sentence(long).endswith("word ...") and len(_first_sentence(long)) <= 164
    for empty in ("", "  "):
        with pytest.raises(CheckpointError, match="the model path is empty"):
            looplm.load(empty)


def test_a_hub_id_in_the_local_hub_cache_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model downloaded once keeps working without a network, from huggingface_hub's cache layout."""
    from huggingface_hub import constants

    from looplm.default_model import default_model_dir

    repo = tmp_path / "hub" / "models--acme--tiny-ouro"
    shutil.copytree(default_model_dir(), repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = looplm.load("acme/tiny-ouro")
    assert torch.equal(model.lm_head.weight, looplm.load().lm_head.weight)
    with pytest.raises(HubError, match="acme/other"):  # not in the cache: still the one-line error
        looplm.load("acme/other")


def test_bad_dtype_and_device(ckpt: Path) -> None:
    with pytest.raises(ConfigError):
        looplm.load(ckpt, dtype="int3")
    for device in ("tpu", "mps", "cuda:x", 3.5):  # not a device, or not one looplm runs on
        with pytest.raises(ConfigError) as info:
            looplm.load(ckpt, device=device)
        assert_one_line(info.value, str(device), "cpu, cuda, cuda:N or auto")
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError) as info:
        looplm.load(ckpt, device=missing)
    assert_one_line(info.value, missing)


def test_auto_device_is_cuda_only_when_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_default_model_is_created_once_and_loads() -> None:
    model = looplm.load()
    assert model.config.model_type == "ouro" and model.tokenizer is not None
    again = looplm.load()
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


COMPILER_MODULES = ("torch._dynamo", "torch.fx.experimental.symbolic_shapes")


def test_loading_and_generating_do_not_import_the_compiler() -> None:
    """torch's init functions and meta-tensor ops import torch._dynamo and torch.fx on first use, a
    second and a half of every CLI command's start-up; the loader avoids both."""
    code = (
        "import sys, looplm; model = looplm.load(); model.generate([[5, 6, 7]], max_new_tokens=2); "
        f"print([m for m in {COMPILER_MODULES!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_model_built_off_the_meta_device_has_an_initialised_embedding() -> None:
    from looplm.config import OuroConfig
    from looplm.models.ouro import OuroForCausalLM

    raw = json.loads((Path(looplm.default_model.default_model_dir()) / "config.json").read_text())
    model = OuroForCausalLM(OuroConfig.from_dict(raw))
    weight = model.model.embed_tokens.weight
    assert weight.requires_grad and torch.isfinite(weight).all()
    assert 0.9 < weight.std().item() < 1.1  # torch's N(0, 1) default
