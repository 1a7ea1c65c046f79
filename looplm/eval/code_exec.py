"""Run model-written code against HumanEval tests: a child process, a timeout, no network.

Only ever called after the user passed `--allow-code-execution`. Each program runs in its own
`python -I` process in an empty temporary directory with a minimal environment. Before the
program runs, the child (Linux) tries to enter a new network namespace, which leaves it with no
network interface at all; where that is not permitted, it replaces `socket.socket` and
`socket.create_connection` with functions that raise. It also caps its own memory (2 GiB address
space) and CPU time. This is a guard against accidents, not a security boundary: run untrusted
models' code inside a container or VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

_PRELUDE = r'''
import ctypes, resource, socket, sys
try:
    if sys.platform.startswith("linux"):
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
            raise OSError("unshare not permitted")
except Exception:
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled during code evaluation")
    socket.socket = _no_network
    socket.create_connection = _no_network
    socket.socketpair = _no_network
for limit, value in ((resource.RLIMIT_AS, 2 << 30), (resource.RLIMIT_CPU, {cpu_seconds})):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
del ctypes, resource, socket
'''


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program to run: the model's function (or the stub + its body), the tests, the check call."""
    if f"def {entry_point}" in completion:
        # A whole function: keep the stub's imports (and helpers) by putting the prompt first;
        # the model's definition comes later and wins.
        body = prompt + "\n    pass\n\n" + completion
    else:
        body = prompt + completion
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def run_program(program: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run `program`; (passed, reason) where reason is "passed", "timeout" or the error's last line."""
    with tempfile.TemporaryDirectory(prefix="looplm-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(_PRELUDE.replace("{cpu_seconds}", str(int(timeout_s) + 1)) + program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "HOME": tmp, "TMPDIR": tmp}
        try:
            proc = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, env=env, capture_output=True,
                                  text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if proc.returncode == 0:
        return True, "passed"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return False, (lines[-1][:200] if lines else f"exit code {proc.returncode}")
