"""The GPU benchmark's pure parts (roofline arithmetic, tables, refusal) and its body on CPU."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from looplm.bench_cuda import (
    CudaBenchOptions,
    add_roofline,
    build_random_model,
    datasheet_gb_s,
    decode_bytes,
    format_report,
    main,
    markdown_table,
    measure_decode,
    parse_inductor_options,
    quantize_int4,
    roofline_tok_s,
    run_cuda_bench,
    run_static_bench,
    spread,
    target_check,
)
from looplm.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


@no_cuda
def test_refuses_in_one_line_without_cuda() -> None:
    with pytest.raises(ConfigError, match="CUDA") as info:
        run_cuda_bench(CudaBenchOptions())
    assert "\n" not in str(info.value)


@no_cuda
def test_main_prints_one_error_line_without_cuda(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and "CUDA" in captured.err


def test_roofline_arithmetic() -> None:
    # The number: 1.4B bf16 reads ~10.07 GB per token; an H100 SXM's 3.35 TB/s gives ~333 tok/s.
    assert roofline_tok_s(3350.0, 10.07e9, 1) == pytest.approx(332.7, abs=0.1)
    assert roofline_tok_s(3350.0, 10.07e9, 8) == pytest.approx(8 * 332.7, abs=1)
    row = {"batch": 2, "weight_bytes_per_step": 10e9, "kv_bytes_per_step": 2.5e9,
           "tok_s_aggregate": spread([400.0, 380.0, 420.0])}
    add_roofline(row, read_gb_s=3000.0, datasheet=3350.0)
    assert row["roofline_tok_s"] == pytest.approx(600.0)  # 2 x 3000e9 / 10e9
    assert row["roofline_kv_tok_s"] == pytest.approx(480.0)  # 2 x 3000e9 / 12.5e9
    assert row["pct_roofline"] == pytest.approx(100 * 400 / 600)
    assert row["pct_roofline_kv"] == pytest.approx(100 * 400 / 480)
    assert row["achieved_gb_s"] == pytest.approx(200 * 12.5)  # 200 steps/s x 12.5 GB
    assert row["datasheet_roofline_tok_s"] == pytest.approx(670.0)
    assert row["pct_datasheet_roofline"] == pytest.approx(100 * 400 / 670)


def test_datasheet_lookup() -> None:
    assert datasheet_gb_s("NVIDIA H100 80GB HBM3") == 3350.0
    assert datasheet_gb_s("NVIDIA H100 PCIe") == 2000.0
    assert datasheet_gb_s("NVIDIA H100 NVL") == 3900.0
    assert datasheet_gb_s("NVIDIA H200") == 4800.0
    assert datasheet_gb_s("NVIDIA A100-SXM4-80GB") == 2039.0
    assert datasheet_gb_s("cpu") is None


def test_decode_bytes_of_the_1_4b_shape_match_the_cpu_bench() -> None:
    """Built on the meta device: no memory. Same count as looplm.bench.model_bytes (10.07 GB)."""
    from looplm.bench import model_bytes

    model = build_random_model("1.4b", torch.device("meta"))
    ours = decode_bytes(model)
    assert ours["bytes_per_decoded_token"] == model_bytes(model)["bytes_per_decoded_token"]
    assert ours["bytes_per_decoded_token"] / 1e9 == pytest.approx(10.07, abs=0.01)
    assert ours["weight_bytes"] / 1e9 == pytest.approx(2.869, abs=0.001)


def _synthetic_result(pct_rows: list[tuple[str, int, float]]) -> dict:
    rows = []
    for dtype, batch, tok_s in pct_rows:
        row = {"dtype": dtype, "batch": batch, "status": "ok", "weight_bytes_per_step": 10.07e9,
               "kv_bytes_per_step": 0.9e9 * batch, "tok_s_aggregate": spread([tok_s, tok_s * 0.98, tok_s * 1.01]),
               "ms_per_step": spread([1000 * batch / tok_s]), "prefill_tok_s": spread([20000.0]), "setup_seconds": 1.5}
        rows.append(add_roofline(row, 2900.0, 3350.0))
    rows.append({"dtype": "int4", "batch": 1, "status": "not available: looplm.quant has no quantize_model"})
    return {"date": "2026-11-23T00:00:00+00:00", "cache_len": 837, "datasheet_gb_s": 3350.0,
            "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "12.x"},
            "bandwidth": {"buffer_bytes": 4 << 30, "read_gb_s": spread([2900.0]), "copy_gb_s": spread([2600.0])},
            "options": {"shape": "1.4b", "mode": "graph", "prompt_len": 512, "new_tokens": 64, "repeats": 5,
                        "warmup_steps": 4},
            "rows": rows, "target": target_check(rows)}


def test_table_and_report() -> None:
    result = _synthetic_result([("bf16", 1, 240.0), ("bf16", 8, 1500.0)])
    table = markdown_table(result["rows"])
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert "| bf16 | 1 | 240.0 [235.2-242.4] |" in lines[2]
    assert "not available" in lines[4]
    report = format_report(result)
    # 240 tok/s of a 2900 GB/s roofline (288 tok/s) is 83%; of the datasheet's 333 tok/s, 72%.
    assert "83% of the measured-bandwidth roofline (met)" in report
    assert "72% of the datasheet roofline (met)" in report


def test_target_not_met_and_missing() -> None:
    assert target_check(_synthetic_result([("bf16", 1, 200.0)])["rows"])["met_datasheet"] is False
    assert target_check(_synthetic_result([("bf16", 8, 1500.0)])["rows"]) is None


@pytest.mark.parametrize("bad", [{"dtypes": ("fp8",)}, {"batch_sizes": (0,)}, {"mode": "fast"}, {"shape": "7b"},
                                 {"new_tokens": 0}, {"profile_steps": -1},
                                 {"attention": "paged"},
                                 {"mode": "graph", "inductor_options": {"coordinate_descent_tuning": True}},
                                 {"mode": "compile", "inductor_options": {"no_such_option": 1}},
                                 {"mode": "compile", "compile_mode": "fastest", "inductor_options": {"max_autotune": True}}])
def test_bad_options(bad: dict) -> None:
    with pytest.raises(ConfigError):
        CudaBenchOptions(**bad).check()


def test_inductor_option_parsing() -> None:
    assert parse_inductor_options(["coordinate_descent_tuning=true", "triton.max_tiles=3", "a=0.5", "b=x y",
                                   "c=False"]) == {"coordinate_descent_tuning": True, "triton.max_tiles": 3,
                                                   "a": 0.5, "b": "x y", "c": False}
    for bad in ("coordinate_descent_tuning", "=1"):
        with pytest.raises(ConfigError, match="NAME=VALUE"):
            parse_inductor_options([bad])


def test_whole_benchmark_body_runs_on_cpu_with_the_tiny_shape() -> None:
    options = CudaBenchOptions(shape="tiny", batch_sizes=(1, 2), prompt_len=8, new_tokens=3, repeats=2,
                               warmup_steps=1, mode="eager", bandwidth_mib=4, bandwidth_repeats=2, int4_group_size=32)
    result = run_static_bench(options, torch.device("cpu"), log=lambda message: None)
    rows = {(r["dtype"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("bf16", 1), ("bf16", 2), ("int4", 1), ("int4", 2)}
    bf16 = rows[("bf16", 2)]
    assert bf16["status"] == "ok" and bf16["tok_s_aggregate"]["n"] == 2 and bf16["pct_roofline"] > 0
    assert bf16["cache_len"] == 8 + 1 + 1 + 2 * 3
    assert bf16["kv_bytes_per_step"] == 2 * (4 * 2) * 2 * 4 * 16 * bf16["cache_len"] * 2  # K+V, T*L slots, B=2
    # The tiny shape's 176 MLP features fit no int4 group size: the row says why, the others still ran.
    assert rows[("int4", 1)]["status"].startswith(("not available", "failed: quantize_model raised"))
    assert result["target"] is not None
    assert "| bf16 | 1 |" in format_report(result)


def test_fused_projection_rows_on_cpu() -> None:
    """--fuse-projections: bf16 rows decode through the fused step, int4 rows keep their kernels."""
    options = CudaBenchOptions(shape="tiny", batch_sizes=(1,), prompt_len=8, new_tokens=3, repeats=2, warmup_steps=1,
                               mode="eager", bandwidth_mib=4, bandwidth_repeats=2, fuse_projections=True)
    result = run_static_bench(options, torch.device("cpu"), log=lambda message: None)
    bf16 = next(r for r in result["rows"] if r["dtype"] == "bf16")
    assert bf16["status"] == "ok" and bf16["fused_projections"] is True and bf16["attention"] == "sdpa"
    assert "q|k|v and gate|up fused" in format_report(result)


def test_profile_reports_time_per_step_and_top_entries() -> None:
    """--profile-steps traces decode steps after the timed windows (CPU operators here) and the
    report prints the time per step against the step's wall time."""
    options = CudaBenchOptions(shape="tiny", dtypes=("bf16",), batch_sizes=(1,), prompt_len=8, new_tokens=2,
                               repeats=1, warmup_steps=0, mode="eager", bandwidth_mib=4, bandwidth_repeats=1,
                               profile_steps=3)
    assert options.cache_len() == 8 + 1 + 2 + 3
    result = run_static_bench(options, torch.device("cpu"), log=lambda message: None)
    profile = result["rows"][0]["profile"]
    assert profile["kind"] == "CPU operator" and profile["steps"] == 3
    assert profile["top"] and profile["us_per_step"] >= profile["top"][0]["us_per_step"] > 0
    names = {entry["name"] for entry in profile["top"]}
    assert any("linear" in name or "mm" in name for name in names)  # the projections show up
    assert "profile bf16 batch 1: CPU operator time" in format_report(result)


def test_int4_rows_when_looplm_quant_exists(make_checkpoint) -> None:  # noqa: ANN001
    """With `looplm.quant.quantize_model`, the int4 model decodes through the static step and
    reads fewer bytes; without it the row says 'not available'."""
    import looplm

    model = looplm.load(make_checkpoint(seed=2), dtype="bfloat16")  # hidden 64, MLP 128: group 32 fits
    bf16_bytes = decode_bytes(model)["bytes_per_decoded_token"]
    quantized, status = quantize_int4(model, group_size=32)
    try:
        has_quant = hasattr(importlib.import_module("looplm.quant"), "quantize_model")
    except ImportError:
        has_quant = False
    if not has_quant:
        assert quantized is None and status.startswith("not available")
        return
    assert status == "ok"
    assert decode_bytes(quantized)["bytes_per_decoded_token"] < bf16_bytes
    options = CudaBenchOptions(prompt_len=6, new_tokens=2, repeats=2, warmup_steps=1, mode="eager")
    row = measure_decode(quantized, 1, options, torch.device("cpu"))
    assert row["status"] == "ok" and row["tok_s_aggregate"]["median"] > 0


def test_compare_saved_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--compare prints saved runs side by side with speed-ups against the first, without a GPU."""
    base = _synthetic_result([("bf16", 1, 134.0), ("bf16", 8, 880.0)])
    variant = _synthetic_result([("bf16", 1, 201.0), ("bf16", 8, 880.0)])
    variant["options"].update(mode="compile+graph", attention="flex", inductor_options={"coordinate_descent_tuning": True})
    for row in variant["rows"]:
        row.update(attention="flex", fused_projections=True)
    paths = []
    for name, result in (("compiled-bf16", base), ("flex-fused-bf16", variant)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    assert main(["--compare", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "vs compiled-bf16" in lines[0] and len({line.count("|") for line in lines}) == 1
    flex_b1 = next(line for line in lines if line.startswith("| flex-fused-bf16") and "| bf16 | 1 |" in line)
    assert "| flex | yes |" in flex_b1 and "| 1.50x |" in flex_b1
    assert "| compile+graph coordinate_descent_tuning=True |" in flex_b1
    assert any("not available" in line for line in lines)
    assert main(["--compare", str(tmp_path / "missing.json")]) == 1
    for name, text in (("list", "[1, 2]"), ("other", '{"a": 1}'), ("bad-rows", '{"rows": [1]}')):
        (tmp_path / f"{name}.json").write_text(text)
        capsys.readouterr()
        assert main(["--compare", str(paths[0]), str(tmp_path / f"{name}.json")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a saved `looplm bench --device cuda` run" in err[0], err


def test_dynamic_mode_times_the_dynamic_decode_step() -> None:
    """--mode dynamic: the same rows through decode_step; K/V bytes count the written positions only."""
    common = {"shape": "tiny", "dtypes": ("bf16",), "batch_sizes": (1,), "prompt_len": 8, "new_tokens": 3,
              "repeats": 2, "warmup_steps": 1, "bandwidth_mib": 4, "bandwidth_repeats": 2}
    rows = {mode: run_static_bench(CudaBenchOptions(mode=mode, **common), torch.device("cpu"),
                                   log=lambda message: None)["rows"][0] for mode in ("dynamic", "eager")}
    assert rows["dynamic"]["status"] == "ok" and rows["dynamic"]["tok_s_aggregate"]["n"] == 2
    static_kv = rows["eager"]["kv_bytes_per_step"]  # the whole capacity: 8 + 1 + 1 + 2 x 3 = 16 positions
    assert rows["dynamic"]["kv_bytes_per_step"] == static_kv * 15 // 16  # 15 written by the last timed step


def test_a_failed_json_out_write_keeps_the_printed_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The document is printed before --json-out is written, so a write that fails at the end loses nothing."""
    import looplm.bench_cuda as bench_cuda

    result = _synthetic_result([("bf16", 1, 240.0)])
    monkeypatch.setattr(bench_cuda, "run_cuda_bench", lambda options: result)
    monkeypatch.setattr(bench_cuda, "check_writable", lambda path, option: None)  # as if the disk filled up later
    assert main(["--json-out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == result
    assert captured.err.startswith(f"error: could not write {tmp_path} (") and "printed above" in captured.err
