"""`looplm.load`: an HF-layout directory, a hub id or a .gguf file -> a ready model.

Directory layout: config.json, model.safetensors or sharded model-*.safetensors with
model.safetensors.index.json, and optionally generation_config.json, tokenizer.json,
tokenizer_config.json. Only safetensors and GGUF are read: never pickle, never remote code.
The model is built on the meta device and each weight is read straight into its final
dtype and place, so peak memory stays close to the weights' size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from looplm.config import OuroConfig, read_json, token_ids
from looplm.devices import resolve_device
from looplm.errors import CheckpointError, ConfigError, HubError
from looplm.kernels.cpu import apply_kernels, int4_layout
from looplm.models.ouro import OuroForCausalLM
from looplm.quant import Int8Linear, QuantSpec, quantize_model
from looplm.quant.checkpoint import check_requested, load_quantized, stored_spec
from looplm.weights import check_layer_count, empty_model, fill_weights, index_weights

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


def load(
    path_or_id: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    steps: int | None = None,
    quant: str | None = None,
    group_size: int = 128,
    kernels: str = "auto",
) -> OuroForCausalLM:
    """Load a model for inference. `None` loads the embedded default model.

    `device` is "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    `steps` overrides the config's `total_ut_steps` (1 to 8, or to its own count if higher).
    `quant` ("int8" or "int4", with `group_size` for int4) quantizes the layer projections while
    loading (looplm.quant); a
    checkpoint written by `looplm quantize` loads quantized without it. `kernels="auto"` runs a bf16
    model on CPU through looplm's C++ kernels (`looplm.kernels`); "torch" keeps plain torch ops.
    """
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    spec = _quant_spec(quant, group_size)  # bad settings fail before any file is read
    if path_or_id is None:
        from looplm.default_model import default_model_dir

        path = default_model_dir()
    else:
        path = resolve_path(str(path_or_id))
    layout = int4_layout(kernels, device, torch_dtype)
    if path.is_file() and path.suffix.lower() == ".gguf":
        model = _load_gguf(path, torch_dtype, device)
        if spec is not None:
            quantize_model(model, spec, int4_layout=layout)
    else:
        model = _load_directory(path, torch_dtype, device, spec, layout)
    if steps is not None:
        model.config = model.config.with_steps(steps)
    model.source = str(path_or_id) if path_or_id is not None else "default"
    model.kernels = apply_kernels(model, kernels)
    warn_int8_on_cuda(model, device)
    return model.eval()


def warn_int8_on_cuda(model: OuroForCausalLM, device: torch.device) -> bool:
    """Warn (and return True) when int8 projections will run on a GPU, where looplm has no fused
    int8 kernel: each call converts the whole int8 weight to the activation dtype first."""
    if device.type != "cuda" or not any(isinstance(m, Int8Linear) for m in model.modules()):
        return False
    warnings.warn("int8 on CUDA has no fused kernel in looplm: every projection converts its whole weight to the "
                  "activation dtype on each call, so int8 saves GPU memory but not decode time; int4 runs torch's "
                  "fused CUDA int4 kernel", stacklevel=3)
    return True


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ConfigError(f"dtype {dtype} is not supported (choose bfloat16, float16 or float32)")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype '{dtype}' is not supported (choose {', '.join(DTYPE_NAMES)})")
    return DTYPE_NAMES[dtype]


def resolve_path(path_or_id: str) -> Path:
    """A local path if it exists; otherwise an `owner/name` hub id fetched by huggingface_hub."""
    if not str(path_or_id).strip():  # Path("") is the current directory
        raise CheckpointError("the model path is empty; give a model directory, a .gguf file or a hub id")
    local = Path(path_or_id).expanduser()
    if local.exists():
        return local
    looks_like_hub_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"{path_or_id}: no such file or directory")
    return _download_from_hub(path_or_id)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise HubError(f"{repo_id}: huggingface_hub is not installed; download the model and pass its directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as exc:  # the hub raises many types; all mean "could not get it"
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            reason = "HF_HUB_OFFLINE is set and the model is not in the local hub cache"
        else:
            reason = _first_sentence(str(exc)) or type(exc).__name__
        raise HubError(
            f"{repo_id}: could not download from the Hugging Face hub ({reason}); "
            "if you are offline, download the model elsewhere and pass its local directory with -m PATH"
        ) from None


def _first_sentence(text: str, most: int = 160) -> str:
    """An error's first sentence, or its first words up to `most` characters: a one-line reason."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = line.split(". ", 1)[0].rstrip(".")
    return sentence if len(sentence) <= most else sentence[:most].rsplit(" ", 1)[0] + " ..."


def _quant_spec(quant: str | None, group_size: int) -> QuantSpec | None:
    return None if quant is None else QuantSpec.parse(quant, group_size)


def _load_directory(path: Path, dtype: torch.dtype, device: torch.device, spec=None,  # noqa: ANN001
                    int4_layout: str | None = None) -> OuroForCausalLM:
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
    config = OuroConfig.from_file(path / "config.json")
    stored = None
    if "quantization_config" in read_json(path / "config.json"):
        stored = stored_spec(read_json(path / "config.json"), path)
        check_requested(path, stored, spec)
    entries = index_weights(path, quantized=stored is not None)
    check_layer_count(config, entries, path)
    if stored is not None or spec is not None:
        model = load_quantized(path, config, entries, dtype, device, stored or spec, stored=stored is not None,
                               int4_layout=int4_layout)
    else:
        model = empty_model(config, dtype, device, entries, path)
        fill_weights(model, entries, path)
    model.tokenizer = _load_tokenizer(path)
    if model.tokenizer is not None and model.tokenizer.vocab_size > config.vocab_size:
        # A smaller embedding than the tokenizer: some text encodes to ids the model has no row for.
        raise CheckpointError(f"{path}: the tokenizer has {model.tokenizer.vocab_size} tokens but config.json's "
                              f"vocab_size is {config.vocab_size}; they belong to different models")
    model.generation_defaults = _generation_defaults(path, config, model.tokenizer)
    return model


def _load_tokenizer(path: Path):  # noqa: ANN202 - Tokenizer | None, imported lazily
    if not (path / "tokenizer.json").exists():
        return None
    from looplm.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def _generation_defaults(path: Path, config: OuroConfig, tokenizer) -> dict:  # noqa: ANN001
    """Stop ids and sampling defaults from generation_config.json, config.json and the tokenizer.

    Ouro revisions disagree on eos (0 or 2), so every eos id any file lists is a stop id, and so
    is the tokenizer's end-of-turn token (`<|im_end|>`), which every revision's chat turns end with.
    """
    gen_file = path / "generation_config.json"
    raw = read_json(gen_file) if gen_file.exists() else {}
    eos = set(config.eos_token_ids) | set(token_ids(raw.get("eos_token_id"), "eos_token_id", str(gen_file)))
    if tokenizer is not None:
        eos.update(_tokenizer_stop_ids(tokenizer))
    defaults: dict = {"eos_token_ids": sorted(eos)}
    pad = raw.get("pad_token_id", config.pad_token_id)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_id
    defaults["pad_token_id"] = token_ids(pad, "pad_token_id", str(gen_file))[0] if pad is not None else (
        min(eos) if eos else 0)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"):
        if raw.get(key) is not None:
            defaults[key] = raw[key]
    if raw.get("do_sample") is False:  # HF decodes greedily then, whatever temperature the file names
        defaults["temperature"] = 0.0
    _check_sampling_defaults(defaults, gen_file)
    return defaults


def _check_sampling_defaults(defaults: dict, source: Path) -> None:
    """A ConfigError naming the file, not a message that reads as if the user passed a bad flag."""
    from looplm.errors import GenerationError
    from looplm.sampling import SamplingParams

    sampling = {key: defaults[key] for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                if key in defaults}
    try:
        SamplingParams(**sampling)
    except GenerationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    most = defaults.get("max_new_tokens")
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
        raise ConfigError(f"{source}: max_new_tokens must be a positive integer, got {most!r}")


def _tokenizer_stop_ids(tokenizer) -> set[int]:  # noqa: ANN001 - looplm.tokenizer.Tokenizer
    """The tokenizer's eos id and its end-of-turn ids."""
    eos = tokenizer.end_of_turn_ids
    if tokenizer.eos_id is not None:
        eos.add(tokenizer.eos_id)
    return eos


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> OuroForCausalLM:
    from looplm.gguf_loader import read_gguf

    checkpoint = read_gguf(path, dtype)
    config = OuroConfig.from_dict(checkpoint.config, source=str(path))
    with torch.device("meta"):
        model = OuroForCausalLM(config)
    state = dict(checkpoint.state_dict)
    if config.tie_word_embeddings:  # state_dict() of a tied model lists both names
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:2]) or str(exc)
        raise CheckpointError(f"{path}: weights do not match the metadata ({detail[:200]})") from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype)
    model.tokenizer = checkpoint.tokenizer
    eos = set(config.eos_token_ids)
    if model.tokenizer is not None:
        eos.update(_tokenizer_stop_ids(model.tokenizer))
    pad = config.pad_token_id if config.pad_token_id is not None else min(eos, default=0)
    model.generation_defaults = {"eos_token_ids": sorted(eos), "pad_token_id": pad}
    return model
