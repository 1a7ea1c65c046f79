"""Run model-written code against HumanEval tests: a child process, a timeout, no network.

Only ever called after the user passed `--allow-code-execution`. Each program runs in its own
`python -I` process group in an empty temporary directory with a minimal environment. Before the
program runs, the child (Linux) tries to enter a new network namespace, which leaves it with no
network interface at all; where that is not permitted, it replaces `socket.socket` and
`socket.create_connection` with functions that raise. It also caps its own memory (2 GiB address
space), CPU time and the size of files it writes. This is a guard against accidents, not a
security boundary: run untrusted models' code inside a container or VM.

A program passes only when it runs to its end: as in OpenAI's human-eval, it is executed as a
module whose `__name__` is not `"__main__"` (a model's own `if __name__ == "__main__":` demo or
`unittest.main()` does not run), and the runner prints a random token after the program returns,
so `sys.exit(0)` or `os._exit(0)` before `check(...)` has finished is a failure, not a pass.
"""

from __future__ import annotations

import os
import secrets
import signal
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
for limit, value in ((resource.RLIMIT_AS, 2 << 30), (resource.RLIMIT_CPU, {cpu_seconds}),
                     (resource.RLIMIT_FSIZE, 64 << 20)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
del ctypes, resource, socket
'''

# Runs program.py as a module named other than "__main__"; any exception, SystemExit included,
# is a failure; reaching the end prints the run's token.
_RUNNER = r'''
import sys, traceback
_source = open("program.py", encoding="utf-8").read()
try:
    exec(compile(_source, "program.py", "exec"), {"__name__": "__humaneval__", "__builtins__": __builtins__})
except BaseException as error:
    if isinstance(error, SystemExit):
        print(f"SystemExit: the program exited ({error.code!r}) before its tests finished", file=sys.stderr)
    else:
        traceback.print_exc()
    sys.stderr.flush()
    import os
    os._exit(1)
sys.stdout.write("\n{token}\n")
sys.stdout.flush()
'''

_TAIL_BYTES = 4096  # what is read back of the program's stdout and stderr


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
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="looplm-exec-") as tmp:
        folder = Path(tmp)
        (folder / "program.py").write_text(program, encoding="utf-8")
        runner = _PRELUDE.replace("{cpu_seconds}", str(int(timeout_s) + 1)) + _RUNNER.replace("{token}", token)
        (folder / "runner.py").write_text(runner, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "HOME": tmp, "TMPDIR": tmp}
        # Output goes to files, not pipes: a background process the program started would hold a
        # pipe open and keep the wait going to the timeout.
        with open(folder / "stdout", "wb") as stdout, open(folder / "stderr", "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-I", "runner.py"], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                    stdout=stdout, stderr=stderr, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)  # the program's children too, whether it finished or not
        if returncode is None:
            return False, "timeout"
        out, err = _tail(folder / "stdout"), _tail(folder / "stderr")
    if returncode == 0 and token in out:
        return True, "passed"
    lines = [line for line in err.splitlines() if line.strip()]
    if lines:
        return False, lines[-1][:200]
    return False, f"exit code {returncode}" if returncode else "the program stopped before its tests finished"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
    proc.wait()


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return handle.read().decode("utf-8", errors="replace")
