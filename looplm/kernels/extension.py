"""Build and load looplm's small C++ CPU kernels (`csrc/`), once per source version.

The extension is compiled with torch's own toolchain helper into a cache directory keyed by
the source hash and the torch/Python versions, so an upgrade never loads a stale build.
`scripts/setup.sh` builds it at install time (`python -m looplm.kernels`); a
process that finds no build compiles it on first use (one to three minutes on 2 cores) and
says so on stderr. The cache is `$LOOPLM_KERNEL_CACHE`, else `~/.cache/looplm/kernels`; when it
cannot be created or written, the build fails like any other (`KernelBuildError`) and loading
falls back to torch ops with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemv.cpp", "attention.cpp", "qdot.cpp", "fused.cpp", "layer.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "stream.h"]  # part of the build's identity, not compiled alone
CFLAGS = ["-O3", "-fopenmp"]  # at::parallel_for only splits work across threads when built with OpenMP
LDFLAGS = ["-fopenmp"]


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or imported."""


def cache_dir() -> Path:
    root = os.environ.get("LOOPLM_KERNEL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "looplm" / "kernels"


def build_name() -> str:
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    return f"looplm_cpu_kernels_{digest.hexdigest()[:12]}"


STALE_LOCK_SECONDS = 600  # no build takes this long; an older lock was left by a killed process


def _built_library(directory: Path, name: str) -> Path | None:
    return next(iter(sorted(directory.glob(f"{name}*.so"))), None)


def _import_library(name: str, library: Path) -> ModuleType:
    """Import an already built extension directly. torch's `load` would take its build lock
    and run ninja even for an up-to-date build; a process killed meanwhile leaves the lock
    behind and every later load waits on it forever."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clear_stale_lock(directory: Path) -> None:
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        print(f"looplm: removing a stale build lock {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)


@cache
def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled kernel module; builds it first if needed. Raises KernelBuildError."""
    from torch.utils import cpp_extension

    name = build_name()
    directory = cache_dir() / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KernelBuildError(f"cannot create the kernel cache {directory} ({error.strerror or error}); "
                               "set LOOPLM_KERNEL_CACHE to a writable directory") from error
    library = _built_library(directory, name)
    if library is not None:
        try:
            return _import_library(name, library)
        except ImportError as error:  # a half-written or foreign build: rebuild it
            print(f"looplm: rebuilding CPU kernels ({error})", file=sys.stderr)
    print(f"looplm: compiling CPU kernels into {directory} (one time, one to three minutes)", file=sys.stderr)
    try:
        _clear_stale_lock(directory)
        _put_ninja_on_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's toolchain chatter (compiler version notes)
            return cpp_extension.load(
                name, [str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(directory), verbose=verbose
            )
    except Exception as error:  # compiler missing, headers missing, link errors: all one story for the user
        raise KernelBuildError(f"could not build looplm's CPU kernels ({_short_reason(error)})") from error


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH. The `ninja` wheel (a dependency of looplm) puts
    the binary in its environment's scripts folder, which is not on PATH when a virtual
    environment's `looplm` runs without the environment activated."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja, or the build says that none was found
    folder = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if folder and folder not in path.split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + path if path else folder


def _short_reason(error: Exception) -> str:
    """The compiler's first `error:` line, else the exception's first line, kept short."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    reason = (errors or lines or [type(error).__name__])[0]
    return reason if len(reason) <= 200 else reason[:197] + "..."



ISA_OVERRIDE = "LOOPLM_CPU_ISA"  # "avx2": run the AVX2 kernels and routes on an AVX-512 machine


@cache
def extension_or_reason() -> tuple[ModuleType | None, str]:
    """(module, cpu path) when the kernels load, else (None, why not).

    `LOOPLM_CPU_ISA=avx2` makes an AVX-512 machine take the AVX2 variants, so that the
    benchmark can show what an AVX2-only CPU gets (with `ONEDNN_MAX_CPU_ISA=AVX2` for torch)."""
    try:
        module = load_extension()
    except KernelBuildError as error:
        return None, str(error)
    override = os.environ.get(ISA_OVERRIDE, "")
    if override not in ("", "avx2"):
        return None, f"{ISA_OVERRIDE}={override!r} is not supported (use avx2 or leave it unset)"
    module.set_force_avx2(override == "avx2")
    path = module.cpu_path()
    if path == "none":
        return None, "this CPU lacks AVX2/FMA, which looplm's CPU kernels need"
    return module, path


def main() -> int:
    try:
        module = load_extension(verbose="-v" in sys.argv)
    except KernelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"looplm CPU kernels ready: {build_name()} ({module.cpu_path()} path) in {cache_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
