"""The wheel carries what an installed looplm needs: the embedded model, the kernels' sources, py.typed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_embedded_model_kernel_sources_and_type_marker(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: setuptools' build/ in the checkout could hold stale files
    shutil.copytree(REPO / "looplm", source / "looplm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
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
