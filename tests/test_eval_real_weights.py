"""The harness on real weights: SmolLM2-135M-Instruct (GGUF, one loop) on HellaSwag and MMLU.

The default run checks two items against the full run recorded in docs/evaluation.md (per
choice log-likelihoods and the acc_norm pick). The slow test reruns the whole 100-row HellaSwag
sample and checks the published number (40.9, zero-shot, lighteval) within sampling error.
"""

from __future__ import annotations

import pytest

import looplm
from looplm.errors import LooplmError
from looplm.eval.harness import EvalSettings, run_eval

# From the full run (docs/evaluation.md): items 0 and 50 of the sample (--limit 2), fp32.
HELLASWAG_ITEMS = {
    "hellaswag-val-00106": (2, [-53.0762, -57.9435, -68.2509, -49.9181]),
    "hellaswag-val-04374": (1, [-167.0554, -82.7103, -116.9669, -78.3596]),
}


@pytest.fixture(scope="module")
def smollm():  # noqa: ANN201
    try:
        from looplm.assets import fetch_asset

        path = fetch_asset("smollm2-gguf")
        fetch_asset("hellaswag-sample")
        fetch_asset("mmlu-test")
    except LooplmError as exc:
        pytest.skip(f"real-weight assets unavailable: {exc}")
    return looplm.load(path, dtype="float32")


def test_hellaswag_items_match_the_recorded_run(smollm, tmp_path) -> None:  # noqa: ANN001
    records = tmp_path / "hs.jsonl"
    results = run_eval(smollm, EvalSettings(task="hellaswag", steps=[1], limit=2, batch_size=8), records)
    assert results["results"][0]["n"] == 2 and results["metric"] == "acc_norm"
    from looplm.eval.harness import read_records

    for row in read_records(records)[1:]:
        pick, logprobs = HELLASWAG_ITEMS[row["id"]]
        assert row["pred"] == pick
        assert row["logprobs"] == pytest.approx(logprobs, abs=0.05)


@pytest.mark.slow
def test_mmlu_subset_runs(smollm, tmp_path) -> None:  # noqa: ANN001
    results = run_eval(smollm, EvalSettings(task="mmlu", steps=[1], limit=3, batch_size=12), tmp_path / "m.jsonl")
    (row,) = results["results"]
    assert (row["steps"], row["exit_policy"], row["n"], row["mean_steps"]) == (1, "last", 3, 1.0)


@pytest.mark.slow
def test_hellaswag_matches_the_published_number(smollm, tmp_path) -> None:  # noqa: ANN001
    results = run_eval(smollm, EvalSettings(task="hellaswag", steps=[1], batch_size=16), tmp_path / "hs.jsonl")
    accuracy = results["results"][0]["accuracy"]
    # Published: 40.9 (model card, zero-shot). 100 items give a standard error of about 5 points.
    assert abs(100 * accuracy - 40.9) < 8, accuracy
