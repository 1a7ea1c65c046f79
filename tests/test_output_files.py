"""Result files of long runs: checked before the run starts, and a failed final write is one error line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from looplm.errors import LooplmError, exit_code_of
from looplm.output_files import PRINTED_ABOVE, check_writable, make_output_dir, write_result


def test_check_writable_accepts_new_files_and_refuses_directories(tmp_path: Path) -> None:
    check_writable(None, "--output")
    check_writable(tmp_path / "new" / "deeper" / "r.json", "--output")  # folders are made when writing
    (tmp_path / "old.json").write_text("{}")
    check_writable(tmp_path / "old.json", "--output")  # replaced
    with pytest.raises(LooplmError, match=r"--json-out .* is a directory; give a file name"):
        check_writable(tmp_path, "--json-out")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LooplmError, match=r"cannot write there \(.*a-file is not a writable directory\)"):
        check_writable(tmp_path / "a-file" / "r.json", "--output")


def test_check_writable_refuses_an_existing_file_it_may_not_write(read_only_file: Path) -> None:
    with pytest.raises(LooplmError, match=r"^--output .*read-only.txt exists and is not writable \(read-only\)$"):
        check_writable(read_only_file, "--output")
    assert read_only_file.read_text() == "kept\n"


def test_check_writable_for_directories_accepts_new_and_existing_ones(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "run", "--out", directory=True)
    check_writable(tmp_path, "--out", directory=True)  # written into
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LooplmError, match=r"--out .*a-file exists and is not a directory"):
        check_writable(tmp_path / "a-file", "--out", directory=True)
    with pytest.raises(LooplmError, match=r"cannot write there \(.*a-file is not a writable directory\)"):
        check_writable(tmp_path / "a-file" / "run", "--out", directory=True)


def test_make_output_dir_makes_parents_or_says_why_not(tmp_path: Path) -> None:
    assert make_output_dir(tmp_path / "a" / "b", "--out").is_dir()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LooplmError, match=r"^--out .*a-file/run: cannot create the directory \(.+\)$"):
        make_output_dir(tmp_path / "a-file" / "run", "--out")


def test_write_result_makes_folders_and_says_where_the_results_are(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    write_result(target, "{}\n", PRINTED_ABOVE)
    assert target.read_text() == "{}\n"
    with pytest.raises(LooplmError, match=rf"could not write {tmp_path} \(.*\); {PRINTED_ABOVE}"):
        write_result(tmp_path, "{}", PRINTED_ABOVE)


# (module, the function its main runs, the output option)
BENCHMARKS = [
    ("looplm.bench", "run_bench", "--json-out"),
    ("looplm.bench_compare", "run_compare", "--json-out"),
    ("looplm.bench_exit", "run", "--json-out"),
    ("looplm.bench_speculative", "measure_acceptance", "--json-out"),
    ("looplm.bench_cuda", "run_cuda_bench", "--json-out"),
    ("looplm.exit_quality", "evaluate", "--output"),
]


@pytest.mark.parametrize(("module_name", "work", "option"), BENCHMARKS)
def test_benchmarks_refuse_an_unwritable_output_before_running(module_name: str, work: str, option: str,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(module_name)

    def must_not_run(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(module, work, must_not_run)
    if module_name == "looplm.exit_quality":
        monkeypatch.setattr(module.looplm, "load", must_not_run)
    assert exit_code_of(lambda: module.main([option, str(tmp_path)])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {option} {tmp_path} is a directory; give a file name"], err
