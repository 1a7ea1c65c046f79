"""Batch-1 decode speed of int8 / int4 models vs bf16, on the Ouro-1.4B layer shape.

Random weights (hidden 2048, intermediate 5632, 16 heads, vocab 49152, T = 4); `--layers`
sets the depth (24 in Ouro-1.4B; fewer keeps the run short, at the cost of giving the
unquantized lm_head a larger share of the bytes read per token). The three models decode the
same tokens in turn (teacher forced, every loop, full KV cache), repeats interleaved, so the
ratios hold on a shared machine. `--kernels torch` (default) runs each model with torch's own
linears (LOOPLM_KERNELS=torch); `--kernels auto` with looplm's C++ kernels (bf16 GEMV, and the
integer dot-product kernels for the quantized layers).

    nice -n 5 python benchmarks/bench_quant_decode.py --layers 8 --threads 1 [--kernels auto]
    nice -n 5 python benchmarks/bench_quant_decode.py --model ~/.cache/looplm/bench/ouro-1.4b-random-bf16-v1-seed0
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import looplm
from looplm.default_model import write_random_checkpoint
from looplm.exit_quality import teacher_forced

OURO_14B = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 49152, "hidden_size": 2048,
    "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "total_ut_steps": 4, "early_exit_threshold": 1.0,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", type=Path, default=None,
                        help="an existing checkpoint to use instead (e.g. the one `looplm bench` writes)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefix", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default="torch", choices=["torch", "auto"])
    args = parser.parse_args()
    os.environ["LOOPLM_KERNELS"] = args.kernels
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or Path(tmp) / "ouro-shape"
        if args.model is None:
            write_random_checkpoint(path, {**OURO_14B, "num_hidden_layers": args.layers})
        models = {
            "bf16": looplm.load(path),
            "int8": looplm.load(path, quant="int8"),
            "int4 g128": looplm.load(path, quant="int4", group_size=128),
        }
    ids = torch.randint(3, 49152, (args.prefix + args.new_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, model in models.items():
            start = time.perf_counter()
            teacher_forced(model, ids, args.prefix, "last", None, "full", False)
            times[name].append((time.perf_counter() - start) / args.new_tokens)
    layers = next(iter(models.values())).config.num_hidden_layers
    print(f"{layers} layers x 4 loops, kernels {args.kernels}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} tokens after a "
          f"{args.prefix}-token prefill, median of {args.repeats}")
    print("| weights | ms / token | speed-up vs bf16 |")
    print("|---|---|---|")
    base = statistics.median(times["bf16"][1:])
    for name, samples in times.items():
        ms = statistics.median(samples[1:])
        print(f"| {name} | {ms * 1e3:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
