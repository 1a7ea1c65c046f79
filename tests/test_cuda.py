"""The CUDA path: fixture parity, generation, the static decode step (CUDA graphs, torch.compile)
and the int4 CUDA kernel. Skipped without a GPU; `benchmarks/gpu_checks.sh` runs them on one."""

from __future__ import annotations

import pytest
import torch
from conftest import decode_greedily, random_prompts

import looplm
from looplm.generate import generate, generate_static
from looplm.quant import Int4Linear, quantize_model
from looplm.quant.kernels import dequantize_int4, quantize_int4
from looplm.static_decode import StaticDecoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fixture_parity_on_cuda(fixture_dir, expected, dtype: str) -> None:  # noqa: ANN001
    """The reference's logits and exit probabilities, with test_parity.py's bounds."""
    model = looplm.load(fixture_dir, dtype=dtype, device="cuda")
    case = f"{dtype}.steps4"
    with torch.inference_mode():
        out = model.forward_steps(expected["input_ids"].to(CUDA), expected["attention_mask"].to(CUDA))
    ref_logits = expected[f"{case}.logits"].float()
    diff = (out.logits.float().cpu() - ref_logits).abs()
    probs_diff = (out.exit_probs.float().cpu() - expected[f"{case}.exit_probs"].float()).abs().max()
    if dtype == "float32":
        assert diff.max() <= 1e-4, f"max abs diff {diff.max():.3g}"
        assert probs_diff <= 1e-5
    else:
        assert diff.max() < 3.0 and diff.mean() < 0.2, f"max {diff.max():.3g} mean {diff.mean():.3g}"
        top1 = (out.logits.argmax(-1).cpu() == ref_logits.argmax(-1)).float().mean()
        assert top1 > 0.85, f"top-1 agreement {top1:.3f}"
        assert probs_diff < 0.05


@pytest.mark.parametrize("gen_case", ["default", "thr0.5"])
def test_fp32_greedy_generation_on_cuda_matches_reference(fixture_dir, expected, expected_meta, gen_case) -> None:  # noqa: ANN001
    model = looplm.load(fixture_dir, dtype="float32", device="cuda")
    spec = expected_meta["cases"]["float32.steps4"]["generate"][gen_case]
    ours = model.generate(expected["input_ids"], 24, exit_threshold=spec["exit_threshold"])
    assert ours == spec["new_tokens_cache"]


def test_shared_kv_and_compute_skipping_run_on_cuda(make_checkpoint) -> None:  # noqa: ANN001
    """The data-dependent paths (rows leaving the batch, KV shared across loops) on the GPU give
    the CPU's tokens for the same fp32 model."""
    path = make_checkpoint(seed=5, num_attention_heads=4, num_key_value_heads=2)
    prompts = random_prompts(300, [7, 15, 11], seed=4)
    kwargs = {"exit_threshold": 0.5, "kv_mode": "shared", "skip_compute": True, "eos_token_ids": []}
    cpu = generate(looplm.load(path, dtype="float32"), prompts, 12, **kwargs)
    gpu = generate(looplm.load(path, dtype="float32", device="cuda"), prompts, 12, **kwargs)
    assert gpu == cpu


def test_the_serving_engine_runs_on_cuda(make_checkpoint) -> None:  # noqa: ANN001
    """The engine behind `looplm serve`, `looplm batch` and `looplm eval` (continuous batching,
    rows joining and leaving, a prompt started from the prefix store) gives the CPU's tokens."""
    from looplm.server.jobs import Job, run_jobs

    path = make_checkpoint(seed=6, num_attention_heads=4, num_key_value_heads=2)
    shared = random_prompts(300, [24], seed=8)[0]
    prompts = [shared + tail for tail in random_prompts(300, [3, 9, 5, 7], seed=9)]
    jobs = [Job(prompt, 6 + 2 * i, steps=4, exit_policy="gate", exit_threshold=0.5) for i, prompt in enumerate(prompts)]

    def tokens(device: str) -> list[list[int]]:
        model = looplm.load(path, dtype="float32", device=device)
        results = run_jobs(model, jobs, max_batch=2, prefix_cache_bytes=1 << 24)
        return [r.tokens for r in sorted(results, key=lambda r: r.index)]

    assert tokens("cuda") == tokens("cpu")


@pytest.mark.parametrize("mode", ["graph", "compile+graph"])
def test_static_decode_graph_modes_match_generate(make_checkpoint, mode: str) -> None:  # noqa: ANN001
    """Captured (and compiled) decode steps give generate's tokens and exit steps on a GQA,
    left-padded batch, at the config's rule and with early exits."""
    path = make_checkpoint(seed=3, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3)
    model = looplm.load(path, dtype="float32", device="cuda")
    prompts = random_prompts(300, [5, 19, 11], seed=1)
    for kwargs in ({}, {"exit_threshold": 0.5}):
        dynamic, dyn_stats = generate(model, prompts, 20, eos_token_ids=[], return_stats=True, **kwargs)
        static, static_stats = generate_static(model, prompts, 20, eos_token_ids=[], return_stats=True,
                                               mode=mode, **kwargs)
        assert static == dynamic
        assert static_stats.steps_per_token == dyn_stats.steps_per_token


@pytest.mark.parametrize(("attention", "fuse"), [("flex", False), ("matmul", False), ("sdpa", True), ("flex", True)])
def test_flex_attention_and_fused_projections_in_the_graph(make_checkpoint, attention: str, fuse: bool) -> None:  # noqa: ANN001
    """The benchmark's A/B options, compiled and captured: FlexAttention or matmul attention over
    the masked static cache (GQA heads read in place) and q|k|v, gate|up fused GEMMs give generate's tokens and
    exit steps on a GQA, left-padded batch with early exits (fp32)."""
    from looplm.exit import make_policy
    from looplm.generate import prepare_inputs

    path = make_checkpoint(seed=3, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3, head_dim=32)
    model = looplm.load(path, dtype="float32", device="cuda")
    ids, mask = prepare_inputs(random_prompts(300, [5, 19, 11], seed=1), None, 0)
    dynamic, stats = generate(model, ids.tolist(), 12, attention_mask=mask, eos_token_ids=[], exit_threshold=0.5,
                              return_stats=True)
    decoder = StaticDecoder(model, 3, 40, policy=make_policy(None, 0.5, 3, None), mode="compile+graph",
                            attention=attention, fuse_projections=fuse)
    assert decode_greedily(decoder, ids, mask, 12)[:2] == (dynamic, stats.steps_per_token)


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_coordinate_descent_compiled_graph_at_batch_one(make_checkpoint, attention: str) -> None:  # noqa: ANN001
    """With Inductor's coordinate_descent_tuning, one-row matmuls become fused reductions
    (Inductor's mm decomposition on CUDA): batch 1, compiled and captured, still gives generate's
    tokens and exit steps (fp32, GQA, early exits)."""
    from looplm.exit import make_policy

    path = make_checkpoint(seed=5, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3, head_dim=32)
    model = looplm.load(path, dtype="float32", device="cuda")
    prompt = random_prompts(300, [13], seed=2)
    dynamic, stats = generate(model, prompt, 12, eos_token_ids=[], exit_threshold=0.5, return_stats=True)
    decoder = StaticDecoder(model, 1, 32, policy=make_policy(None, 0.5, 3, None), mode="compile+graph",
                            attention=attention, compile_options={"coordinate_descent_tuning": True})
    assert decode_greedily(decoder, torch.tensor(prompt), None, 12)[:2] == (dynamic, stats.steps_per_token)


def test_auto_decoder_replays_the_graph_with_stop_strings_and_reuse() -> None:
    """On a GPU, `decoder="auto"` (what `looplm generate` uses) is the captured graph: the
    embedded model's greedy text, exit steps and stop-string cut equal the dynamic step's, and a
    second prompt reuses the captured decoder."""
    from looplm.text import stream_text

    model = looplm.load(None, dtype="float32", device="cuda")

    def run(decoder: str, prompt: str, stop: list[str] | None = None):  # noqa: ANN202
        chunks = list(stream_text(model, prompt, max_new_tokens=24, stop=stop, decoder=decoder))
        return "".join(c.text for c in chunks), chunks[-1]

    for prompt in ("The", "Once upon a time"):
        text, last = run("dynamic", prompt)
        graph_text, graph_last = run("auto", prompt)
        assert graph_last.stats.decoder == "graph"
        assert graph_text == text and graph_last.token_ids == last.token_ids
        assert graph_last.stats.steps_per_token == last.stats.steps_per_token
    assert graph_last.stats.setup_s == 0.0  # the second prompt replayed the first one's graph
    stop = text[len(text) // 2 :][:3]
    assert run("auto", "Once upon a time", [stop])[0] == run("dynamic", "Once upon a time", [stop])[0]


def test_static_decoder_replays_for_a_second_prompt(make_checkpoint) -> None:  # noqa: ANN001
    """One captured graph serves two prompts: the second prompt's tokens equal generate's."""
    model = looplm.load(make_checkpoint(seed=1), dtype="float32", device="cuda")
    decoder = StaticDecoder(model, 1, 64, mode="graph")
    for prompt in random_prompts(300, [9, 23], seed=6):
        logits, _ = decoder.prefill(torch.tensor([prompt]))
        tokens = [int(logits.argmax(-1))]
        for _ in range(11):
            logits, _ = decoder.step(torch.tensor([tokens[-1]], device=CUDA))
            tokens.append(int(logits.argmax(-1)))
        assert tokens == generate(model, [prompt], 12, eos_token_ids=[])[0]


@pytest.mark.parametrize(("rows", "shape"), [(1, (64, 256)), (8, (96, 384)), (33, (5632, 2048))])
def test_int4_cuda_layout_matches_dequantized_weight(rows: int, shape: tuple[int, int]) -> None:
    """torch's CUDA int4 kernel on looplm's quantization equals x @ dequant(W).T to bf16 rounding."""
    gen = torch.Generator(device=CUDA).manual_seed(0)
    weight = torch.randn(shape, generator=gen, device=CUDA) * 0.02
    q, scale, low = quantize_int4(weight, 128)
    module = Int4Linear(q, scale, low, 128, None, torch.bfloat16)
    assert module.layout == "cuda"
    x = torch.randn(rows, shape[1], generator=gen, device=CUDA).to(torch.bfloat16)
    reference = x.float() @ dequantize_int4(q, scale, low, 128, torch.float32).T
    out = module(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, shape[0])
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 2e-2, f"relative error {error:.3g}"
    # the fallback's dequantized weight is the same weight
    assert torch.allclose(module.dequantized_weight().float(), dequantize_int4(q, scale, low, 128, torch.float32),
                          rtol=1e-2, atol=1e-3)


def test_int4_model_on_cuda_uses_the_cuda_kernel_and_decodes(make_checkpoint) -> None:  # noqa: ANN001
    """A bf16 model quantized on the GPU gets the "cuda" layout everywhere, and its static graph
    decode gives the same tokens as generate."""
    path = make_checkpoint(seed=2, hidden_size=128, intermediate_size=256, head_dim=32)
    model = quantize_model(looplm.load(path, dtype="bfloat16", device="cuda"), bits=4, group_size=128)
    layouts = {m.layout for m in model.modules() if isinstance(m, Int4Linear)}
    assert layouts == {"cuda"}
    prompts = random_prompts(300, [13], seed=2)
    dynamic = generate(model, prompts, 12, eos_token_ids=[])
    static = generate_static(model, prompts, 12, eos_token_ids=[], mode="graph")
    # bf16 and full-length masked attention add in another order: equal up to a late near-tie
    assert static[0][:4] == dynamic[0][:4]
