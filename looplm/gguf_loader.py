"""Read a llama.cpp GGUF file into an HF-style Llama config, state dict and tokenizer.

Contract: ``read_gguf(path, dtype)`` returns a ``GGUFCheckpoint`` whose ``config`` describes a
Llama-family model that the Ouro model class runs as one loop (``total_ut_steps == 1``, plain
pre-norm, no exit gate), whose ``state_dict`` uses HF Llama tensor names in HF ``[out, in]``
layout (q/k rows un-permuted back to rotate-half RoPE order), dequantized and cast to ``dtype``,
and whose ``tokenizer`` is a ``looplm.tokenizer.Tokenizer`` built from the GGUF vocabulary.
Only ``general.architecture == "llama"`` with a byte-level BPE ("gpt2") vocabulary is supported;
anything else, and any missing, non-GGUF or truncated file, raises ``CheckpointError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from looplm.errors import CheckpointError

if TYPE_CHECKING:  # the tokenizer module is imported lazily at runtime
    from looplm.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama",)
# tokenizer.ggml.pre values we know how to reproduce with `tokenizers` pre-tokenizers.
SUPPORTED_PRE = ("smollm", "default", "gpt2")
TOKEN_TYPE_CONTROL = 3

# Per-block GGUF tensor name -> HF Llama name (without the "model.layers.{i}." prefix).
_BLOCK_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


@dataclass
class GGUFCheckpoint:
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: "Tokenizer"
    chat_template: str | None


def read_gguf(path: Path, dtype: torch.dtype) -> GGUFCheckpoint:
    """Load a GGUF checkpoint; see the module docstring for the contract."""
    path = Path(path)
    reader = _open(path)
    try:
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable GGUF metadata ({e})") from e
    config = _build_config(path, meta)
    # Everything that can be refused is checked before any tensor is unpacked: unpacking an 8B
    # GGUF takes 16 GB in bf16, and a wrong head count made the un-permute fail with a traceback.
    _check_config(path, config)
    chat_template = meta.get("tokenizer.chat_template")
    tokenizer = _build_tokenizer(path, meta, chat_template)
    _check_tensor_shapes(path, reader, config)
    state_dict = _build_state_dict(path, reader, config, dtype)
    return GGUFCheckpoint(config, state_dict, tokenizer, chat_template)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """The model config's own checks (positive sizes, heads that divide, an even head_dim), and
    special token ids inside the vocabulary."""
    from looplm.config import OuroConfig

    OuroConfig.from_dict(config, source=f"{path} (GGUF metadata)")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = config[key]
        if token is not None and not 0 <= token < config["vocab_size"]:
            raise CheckpointError(f"{path}: GGUF metadata's {key} {token} is outside the vocabulary "
                                  f"(0..{config['vocab_size'] - 1})")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor the config implies (lm_head only if untied)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    per_layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                 "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
                 "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def _check_tensor_shapes(path: Path, reader: Any, config: dict[str, Any]) -> None:
    """Every tensor's name and shape (from the GGUF's tensor index) against the config, and none
    missing, before any is unpacked."""
    expected = _expected_shapes(config)
    seen = set()
    for t in reader.tensors:
        hf = _hf_name(path, t.name, config["num_hidden_layers"])
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML order is innermost first
        if shape != expected[hf]:
            raise CheckpointError(f"{path}: tensor {t.name!r} is {shape}, the metadata implies {expected[hf]}")
        seen.add(hf)
    missing = [name for name in expected if name not in seen and name != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{path}: GGUF lacks {len(missing)} tensors, e.g. {missing[0]!r}")


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad or short files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a valid or complete GGUF file ({msg})") from e


def _req(path: Path, meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata lacks required key {key!r}")
    return meta[key]


def _build_config(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0)))
    # Our RoPE has no scaling; a "linear" entry with factor 1 is a no-op and therefore fine.
    if scaling not in ("none", "linear") or factor not in (0.0, 1.0):
        raise CheckpointError(
            f"{path}: RoPE scaling {scaling!r} (factor {factor}) is not supported; only unscaled RoPE is"
        )
    hidden = int(_req(path, meta, f"{arch}.embedding_length"))
    heads = int(_req(path, meta, f"{arch}.attention.head_count"))
    tokens = _req(path, meta, "tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(_req(path, meta, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_req(path, meta, f"{arch}.block_count")),
        "num_attention_heads": heads,
        # GGUF omits head_count_kv when it equals head_count (no GQA).
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", hidden // heads if heads > 0 else 0)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(_req(path, meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_req(path, meta, f"{arch}.context_length")),
        "tie_word_embeddings": True,  # corrected once the tensor list is known
        "total_ut_steps": 1,
        "bos_token_id": _opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(eos),
        "pad_token_id": _opt_int(meta.get("tokenizer.ggml.padding_token_id")),
    }


def _f32(v: Any) -> float:
    # GGUF stores float32; take its shortest repr so 1e-5 reads back as 1e-05, not 9.99e-06.
    return float(str(np.float32(v)))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _hf_name(path: Path, name: str, n_layers: int) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_MAP and int(m.group(1)) < n_layers:
        return f"model.layers.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}.weight"
    if name == "rope_freqs.weight":  # Llama-3.1-style per-frequency RoPE scaling
        raise CheckpointError(f"{path}: RoPE frequency scaling (rope_freqs) is not supported")
    raise CheckpointError(f"{path}: unexpected tensor {name!r} for a llama GGUF")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves q/k rows for GGML's pairwise RoPE; undo it for rotate-half.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _build_state_dict(
    path: Path, reader: Any, config: dict[str, Any], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    n_layers = config["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _hf_name(path, t.name, n_layers)
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r} ({e})") from e
        # t.shape is GGML order (innermost first); HF layout is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        if arr.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor {t.name!r} has {arr.size} elements, expected {shape}")
        arr = arr.reshape(shape)
        if hf.endswith("q_proj.weight"):
            arr = _unpermute(arr, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            arr = _unpermute(arr, config["num_key_value_heads"])
        # Copy out of the read-only mmap and cast now, so only one fp32 array is alive at a time.
        out[hf] = torch.tensor(arr, dtype=dtype)
        del arr
    config["tie_word_embeddings"] = "lm_head.weight" not in out
    if config["tie_word_embeddings"]:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _build_tokenizer(path: Path, meta: dict[str, Any], chat_template: str | None) -> "Tokenizer":
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from looplm.tokenizer import Tokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
    # tokenizer.ggml.pre names the pre-tokenizer regex llama.cpp uses; we reproduce the ones we
    # know and refuse the rest, because a wrong split silently changes token ids.
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise CheckpointError(
            f"{path}: tokenizer pre-tokenizer {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})"
        )
    tokens: list[str] = list(_req(path, meta, "tokenizer.ggml.tokens"))
    merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges", []))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}: malformed BPE merge {m!r}")
        merges.append((parts[0], parts[1]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit on its own before the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return Tokenizer(
        tok,
        chat_template,
        name("tokenizer.ggml.bos_token_id"),
        name("tokenizer.ggml.eos_token_id"),
        name("tokenizer.ggml.padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
