"""Parity with the golden outputs of the reference implementation (shared/fixtures/ouro-tiny)."""

from __future__ import annotations

import pytest
import torch

import looplm

CASES = ["float32.steps4", "float32.steps2", "bfloat16.steps4", "bfloat16.steps2"]


def load_case(fixture_dir, case: str):  # noqa: ANN001, ANN201
    dtype, steps = case.split(".")
    return looplm.load(fixture_dir, dtype=dtype, steps=int(steps.removeprefix("steps")))


@pytest.fixture(scope="module", params=CASES)
def case_output(request, fixture_dir, expected):  # noqa: ANN001, ANN201
    model = load_case(fixture_dir, request.param)
    with torch.inference_mode():
        out = model.forward_steps(expected["input_ids"], expected["attention_mask"])
    return request.param, model, out


def test_shapes(case_output, expected) -> None:  # noqa: ANN001
    case, model, out = case_output
    steps = model.config.total_ut_steps
    assert out.logits.shape == (steps, 2, 24, 512)
    assert out.exit_probs.shape == (steps, 2, 24)
    assert out.logits.dtype == model.dtype


def test_exit_probs_sum_to_one(case_output) -> None:  # noqa: ANN001
    case, model, out = case_output
    total = out.exit_probs.float().sum(0)
    tol = 1e-5 if case.startswith("float32") else 2e-2
    assert torch.allclose(total, torch.ones_like(total), atol=tol)
    assert not torch.allclose(out.exit_probs.float(), out.gate_lambda.float())  # pdf, not the raw sigmoid


def test_logits_and_exit_probs_match_reference(case_output, expected) -> None:  # noqa: ANN001
    case, model, out = case_output
    ref_logits = expected[f"{case}.logits"].float()
    ref_probs = expected[f"{case}.exit_probs"].float()
    diff = (out.logits.float() - ref_logits).abs()
    if case.startswith("float32"):
        assert diff.max() <= 1e-4, f"max abs diff {diff.max():.3g}"
        assert (out.exit_probs.float() - ref_probs).abs().max() <= 1e-5
        assert (out.gate_lambda.float() - expected[f"{case}.gate_lambda"].float()).abs().max() <= 1e-5
    else:  # the fixture README's bf16 bounds
        assert diff.max() < 3.0 and diff.mean() < 0.2, f"max {diff.max():.3g} mean {diff.mean():.3g}"
        top1 = (out.logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
        assert top1 > 0.85, f"top-1 agreement {top1:.3f}"
        assert (out.exit_probs.float() - ref_probs).abs().max() < 0.05


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_threshold_exit_matches_reference(case_output, expected, threshold: float) -> None:  # noqa: ANN001
    case, model, out = case_output
    # Under inference mode, as `out` was computed: with grad enabled, a bf16 model on an
    # AVX2-only CPU runs its linears on torch's bf16 GEMM instead of looplm's fp32 route, and
    # the two round differently in the last bf16 bit.
    with torch.inference_mode():
        logits, steps = model.exit_logits(out, threshold)
    assert torch.equal(steps, expected[f"{case}.exit_step_thr{threshold}"])
    ref = expected[f"{case}.final_logits_thr{threshold}"].float()
    tol = 1e-4 if case.startswith("float32") else 3.0
    assert (logits.float() - ref).abs().max() <= tol
    # the final logits are the chosen step's logits, bit for bit
    chosen = torch.gather(out.logits, 0, steps[None, ..., None].expand(1, *steps.shape, out.logits.shape[-1]))[0]
    assert torch.equal(logits, chosen)


@pytest.mark.parametrize("threshold", [None, 1.0, 0.5])
def test_calling_the_model_gives_the_reference_forward_logits(case_output, expected, threshold) -> None:  # noqa: ANN001
    """`model(input_ids, attention_mask, exit_threshold=...)`, HF-style; None is the config's 1.0."""
    case, model, out = case_output
    with torch.inference_mode():
        called = model(expected["input_ids"], expected["attention_mask"], exit_threshold=threshold)
    name = 1.0 if threshold is None else threshold
    assert torch.equal(called.exit_steps, expected[f"{case}.exit_step_thr{name}"])
    tol = 1e-4 if case.startswith("float32") else 3.0
    assert (called.logits.float() - expected[f"{case}.final_logits_thr{name}"].float()).abs().max() <= tol
    assert called.loss is None


def first_fork(ours: list[int], ref: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gen_case", ["default", "thr0.5"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_reference(fixture_dir, expected, expected_meta, case, gen_case, use_cache) -> None:  # noqa: ANN001
    model = load_case(fixture_dir, case)
    spec = expected_meta["cases"][case]["generate"][gen_case]
    ours = model.generate(expected["input_ids"], 24, exit_threshold=spec["exit_threshold"], use_cache=use_cache)
    ref = spec["new_tokens_cache" if use_cache else "new_tokens_nocache"]
    if case.startswith("float32"):
        assert ours == ref
        return
    # bf16: the two implementations may fork only where the reference itself saw a near-tie
    margins = expected[f"{case}.gen_{gen_case}.{'cache' if use_cache else 'nocache'}.margin"]
    for row, (our_row, ref_row) in enumerate(zip(ours, ref)):
        fork = first_fork(our_row, ref_row)
        if fork is not None:
            assert margins[row, fork] <= 0.125, f"row {row} forked at token {fork}, margin {margins[row, fork]:.3f}"
