"""Which int4 recipe loses least: per-projection sensitivity, int8 for sensitive projections,
and a least-squares search for each group's (scale, min).

Weights are quantized and dequantized in place (weight-only, torch's ops), so each row
measures the rounding alone, not a kernel. Perplexity: whole documents of held-out GSM8K test
text in one forward pass each, against the unquantized bf16 model on the same documents.

    python benchmarks/bench_int4_recipes.py --model smollm2-135m --group-size 64
    python benchmarks/bench_int4_recipes.py --model tiny-ouro --group-size 128 --sensitivity

Recipes: `minmax` is looplm's quantizer (each group's min and max span the 16 levels);
`search` tries 21 narrower and wider spans per group and refits (scale, min) by least squares
to each rounding (the idea of llama.cpp's k-quants without an importance matrix), keeping the
pair with the smallest squared error; `+ v,down int8` keeps v_proj and down_proj at int8 (in
every layer, or in llama.cpp Q4_K_M's choice of layers: the first and last eighth and every
third one between).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

import looplm
from looplm.assets import fetch_asset
from looplm.kernels.swap import is_layer_projection
from looplm.quant.kernels import INT4_MAX, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

MODELS = {"smollm2-135m": "smollm2-gguf", "tiny-ouro": None}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def heldout_documents(model, count: int, length: int) -> list[list[int]]:  # noqa: ANN001
    from looplm.train.data import gsm8k_documents

    ids = model.tokenizer.encode("".join(gsm8k_documents(fetch_asset("gsm8k-test"))[:400]))
    return [ids[i : i + length] for i in range(0, len(ids) - length, length)][:count]


def perplexity(model, documents: list[list[int]]) -> float:  # noqa: ANN001
    nll, count = 0.0, 0
    with torch.inference_mode():
        for document in documents:
            ids = torch.tensor([document])
            logits = model(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(document) - 1
    return math.exp(nll / count)


def searched_int4(weight: torch.Tensor, group_size: int, candidates: int = 21, refits: int = 2) -> torch.Tensor:
    """Dequantized int4 weight whose per-group (scale, min) minimise the squared rounding error."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    low, span = w.amin(-1), (w.amax(-1) - w.amin(-1)).clamp(min=1e-30)

    def rounding(scale: torch.Tensor, low_: torch.Tensor) -> torch.Tensor:
        return ((w - low_[..., None]) / scale[..., None].clamp(min=1e-30)).round().clamp(0, INT4_MAX)

    def refit(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares (scale, min) for fixed levels q; a group with one level keeps min-max."""
        sq, sqq, sw, sqw = q.sum(-1), (q * q).sum(-1), w.sum(-1), (q * w).sum(-1)
        det = group_size * sqq - sq * sq
        solvable = det > 0
        det = det.clamp(min=1e-30)
        scale = torch.where(solvable, (group_size * sqw - sq * sw) / det, span / INT4_MAX)
        return scale, torch.where(solvable, (sqq * sw - sq * sqw) / det, low)

    def error(scale: torch.Tensor, low_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = rounding(scale, low_)
        return ((q * scale[..., None] + low_[..., None] - w) ** 2).sum(-1), q

    best_error, best_scale, best_low = torch.full_like(low, math.inf), span / INT4_MAX, low.clone()
    starts = [(span / INT4_MAX, low)]
    for i in range(candidates):  # spans of 14 to 16 levels over the group's range
        levels = INT4_MAX - 1 + 2 * i / (candidates - 1)
        starts.append(refit(rounding(span / levels, low)))
    for scale, low_ in starts:
        for _ in range(refits):
            err, q = error(scale, low_)
            better = err < best_error
            best_error = torch.where(better, err, best_error)
            best_scale, best_low = torch.where(better, scale, best_scale), torch.where(better, low_, best_low)
            scale, low_ = refit(q)
    q = rounding(best_scale, best_low)
    return (q * best_scale[..., None] + best_low[..., None]).reshape(n, k)


def apply(model, originals: dict[str, torch.Tensor], recipe: Callable[[str, torch.Tensor], torch.Tensor]) -> None:  # noqa: ANN001
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in originals:
                module.weight.copy_(recipe(name, originals[name]).to(module.weight.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--sensitivity", action="store_true",
                        help="also quantize one kind of projection at a time (min-max)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = str(fetch_asset(MODELS[args.model])) if MODELS[args.model] else None
    model = looplm.load(source, dtype="bfloat16", kernels="torch")
    documents = heldout_documents(model, args.documents, args.length)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if is_layer_projection(n)}
    layers = model.config.num_hidden_layers
    g = args.group_size
    memo: dict[tuple[str, str], torch.Tensor] = {}

    def int4(method: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
        def quantize(name: str, weight: torch.Tensor) -> torch.Tensor:
            if (name, method) not in memo:
                memo[name, method] = (dequantize_int4(*quantize_int4(weight, g), g, torch.float32)
                                      if method == "minmax" else searched_int4(weight, g))
            return memo[name, method]
        return quantize

    def with_int8(base: Callable, chosen: Callable[[str], bool]) -> Callable[[str, torch.Tensor], torch.Tensor]:
        return lambda name, w: dequantize_int8(*quantize_int8(w), torch.float32) if chosen(name) else base(name, w)

    def sensitive(name: str) -> bool:
        return name.endswith(("v_proj", "down_proj"))

    def q4_k_m_layer(name: str) -> bool:
        i = int(name.split("layers.")[1].split(".")[0])
        return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2

    rows: list[tuple[str, Callable]] = []
    if args.sensitivity:
        rows += [(f"only {kind} int4 (min-max)",
                  lambda n, w, k=kind: int4("minmax")(n, w) if n.endswith(k) else w.float()) for kind in KINDS]
    for method in ("minmax", "search"):
        rows += [(f"{method}", int4(method)),
                 (f"{method} + v,down int8 (every layer)", with_int8(int4(method), sensitive)),
                 (f"{method} + v,down int8 (Q4_K_M layers)",
                  with_int8(int4(method), lambda n: sensitive(n) and q4_k_m_layer(n)))]
    reference = perplexity(model, documents)
    print(f"{args.model}, int4 g{g}, {len(documents)} documents of {args.length} tokens; bf16 perplexity {reference:.4f}")
    print("| recipe | perplexity | vs bf16 |")
    print("|---|---|---|")
    for label, recipe in rows:
        apply(model, originals, recipe)
        value = perplexity(model, documents)
        print(f"| {label} | {value:.4f} | {100 * (value / reference - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
