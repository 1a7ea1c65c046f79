"""Perplexity of quantized models vs the unquantized (bf16) model on held-out text.

The text is GSM8K *test* questions with their worked answers (asset `gsm8k-test`; tiny-ouro
trained on train splits only). Perplexity is `looplm.exit_quality.teacher_forced_batch`: a
prefix is prefilled, then every scored token goes through the real decode path one step at a
time (last loop's logits, full KV cache), with `--batch` documents as the rows of one batch (at
most 8, so every decode step multiplies 1-8 rows: the decode kernels, never the prefill route).

`--kernels auto` (default) runs the model as `looplm.load` does: on a bf16 CPU model with
looplm's C++ kernels, the quantized layers decode through the integer dot-product kernels,
which also quantize the activations to int8 (blocks of 32). `--kernels torch` measures
weight-only quantization with torch's ops (activations stay bf16). The `kernels` column says
what ran.

    nice -n 5 python benchmarks/bench_quant_quality.py            # both models
    nice -n 5 python benchmarks/bench_quant_quality.py --models tiny-ouro --documents 8 --kernels torch
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import looplm
from looplm.assets import fetch_asset
from looplm.exit_quality import Setting, teacher_forced_batch
from looplm.kernels.swap import is_layer_projection

MODELS = {"smollm2-135m": "smollm2-gguf", "tiny-ouro": None}  # name -> asset (None: embedded model)


def heldout_text(items: int) -> str:
    """GSM8K test items written as tiny-ouro's training text was (`gsm8k_documents`)."""
    from looplm.train.data import gsm8k_documents

    return "".join(gsm8k_documents(fetch_asset("gsm8k-test"))[:items])


def perplexity(model, documents: list[list[int]], prefix_len: int, batch: int) -> tuple[float, int]:  # noqa: ANN001
    setting = Setting("", "last", None, "full", False)
    nll, count = 0.0, 0
    for start in range(0, len(documents), batch):
        for result in teacher_forced_batch(model, documents[start : start + batch], prefix_len, setting):
            nll, count = nll + result["nll"], count + result["tokens"]
    return math.exp(nll / count), count


def kernels_used(model) -> str:  # noqa: ANN001
    """Which linear kernels decode runs: looplm's (and for which quantized layers) or torch's."""
    info = model.kernels
    if not info:
        return "torch"
    quantized = [f"{name} dot" for name, key in (("int8", "int8_linears"), ("int4", "int4_linears")) if info.get(key)]
    return "looplm " + (", ".join(quantized) if quantized else "bf16 GEMV")


def variants(groups: list[int], lm_head: bool) -> list[tuple[str, dict]]:
    rows = [("bf16", {}), ("int8", {"quant": "int8"})]
    if lm_head:
        rows.append(("int8 + lm_head int8", {"quant": "int8", "lm_head": True}))
    rows += [(f"int4 g{g}", {"quant": "int4", "group_size": g}) for g in groups]
    return rows


def load_variant(source: str | None, options: dict, kernels: str):  # noqa: ANN201
    lm_head = options.pop("lm_head", False)
    model = looplm.load(source, dtype="bfloat16", kernels=kernels, **options)
    if lm_head:  # not offered by looplm.quant: measured here with the int8-rounded weight in place
        from looplm.quant.kernels import dequantize_int8, quantize_int8

        with torch.no_grad():
            weight = model.lm_head.weight
            weight.copy_(dequantize_int8(*quantize_int8(weight), weight.dtype))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--length", type=int, default=160, help="tokens per document, prefix included")
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--skip", nargs="*", default=[], help="row labels to leave out (bf16 always runs)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--threads", type=int, default=1, help="one thread: the 2-core box is shared")
    parser.add_argument("--batch", type=int, default=8, choices=range(1, 9), metavar="1-8",
                        help="documents decoded together (rows per decode step)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = heldout_text(400)
    results = []
    print("| model | weights | kernels | perplexity | change vs bf16 | scored tokens | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        source = str(fetch_asset(MODELS[name])) if MODELS[name] else None
        base = looplm.load(source, dtype="bfloat16", kernels="torch")
        ids = base.tokenizer.encode(text)
        documents = [ids[i : i + args.length] for i in range(0, len(ids) - args.length, args.length)][: args.documents]
        tied = base.config.tie_word_embeddings
        base_linears = [m for n, m in base.named_modules() if is_layer_projection(n)]
        del base
        reference = None
        for label, options in variants(args.groups, lm_head=not tied):
            if label in args.skip:
                continue
            in_features = {m.in_features for m in base_linears}
            if options.get("quant") == "int4" and any(k % options["group_size"] for k in in_features):
                print(f"| {name} | {label} | | not possible: {options['group_size']} does not divide "
                      f"{sorted(in_features)} |  |  |  |")
                continue
            start = time.perf_counter()
            model = load_variant(source, dict(options), args.kernels)
            used = kernels_used(model)
            ppl, count = perplexity(model, documents, args.prefix_len, args.batch)
            del model
            reference = reference or ppl
            change = 100 * (ppl / reference - 1)
            seconds = time.perf_counter() - start
            print(f"| {name} | {label} | {used} | {ppl:.4f} | {change:+.2f}% | {count} | {seconds:.0f} |", flush=True)
            results.append({"model": name, "weights": label, "kernels": used, "perplexity": ppl, "change_pct": change,
                            "tokens": count})
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
