"""The wheel carries what an installed looplm needs: the embedded model, the kernels' sources, py.typed,
the license; the sdist carries no half test suite; optional extras say how to install them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from looplm.errors import LooplmError

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")


def test_the_wheel_ships_the_embedded_model_kernel_sources_and_type_marker(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: setuptools' build/ in the checkout could hold stale files
    shutil.copytree(REPO / "looplm", source / "looplm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("looplm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {name for name in names if name.startswith("looplm/")}
    model = REPO / "looplm" / "data" / "tiny-ouro"
    for path in [*model.iterdir(), *(REPO / "looplm" / "kernels" / "csrc").iterdir(), REPO / "looplm" / "py.typed"]:
        if path.is_file():
            assert path.relative_to(REPO).as_posix() in shipped, path
    assert not any("tests/" in name or name.endswith(".pyc") for name in names)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_the_sdist_has_the_license_and_no_tests(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO / "looplm", source / "looplm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests", source / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, source / name)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    build = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    names = tarfile.open(tmp_path / build.stdout.strip().splitlines()[-1]).getnames()
    assert any(name.endswith("/LICENSE") for name in names)
    assert any(name.endswith("/looplm/data/tiny-ouro/model.safetensors") for name in names)
    assert not any("/tests/" in name for name in names)


def test_ray_serve_without_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from looplm.server.ray_serve import deployment

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(LooplmError, match=r"pip install 'looplm\[ray\]'"):
        deployment(None)


def test_the_lm_eval_command_without_lm_eval_is_one_error_line() -> None:
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; "
            "runpy.run_module('looplm.eval.lm_eval_adapter', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: the lm-eval adapter needs lm-evaluation-harness 0.4.x: pip install 'looplm[lm-eval]'"
