"""Run generated Python in a separate, resource-limited child process (never in the zoo's own process).

:func:`run_program` writes the program into a fresh temporary directory and runs
``python -I -c <guard + exec(program.py)>`` there with:

* a wall-clock timeout: the child runs in its own session and the whole process group is SIGKILLed
  when it expires;
* ``resource.setrlimit`` in the child (between fork and exec): address space (``memory_mb``), CPU
  seconds, file size (output and files it writes), core dumps off, open files;
* stdout/stderr redirected to files in the temporary directory (bounded by the file-size limit) and
  returned truncated to ``max_output`` characters;
* an empty environment (isolated mode ``-I``, no user site, no ``PYTHON*`` variables) and, inside the
  child, a guard that replaces process-spawning, killing, file-deleting and socket functions with ones
  that raise ``PermissionError``, and refuses to open files for writing outside the working directory.

This contains honest mistakes (infinite loops, memory bombs, stray ``os.system``/``rm``) and keeps
the zoo process safe; it is NOT a security boundary against deliberately malicious code (``ctypes``
can undo the guard): run untrusted code in a container or VM.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "killed"]

GUARD = r'''
import builtins, io, os, shutil, subprocess, sys
def _blocked(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is blocked by the zoo sandbox")
    return refuse
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs",
              "rename", "renames", "replace", "truncate", "putenv", "chmod", "chown", "fchmod", "fchown", "lchown",
              "chroot", "setuid", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
              "posix_spawnp", "symlink", "link"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked("os." + _name))
for _name in ("rmtree", "move", "chown"):
    setattr(shutil, _name, _blocked("shutil." + _name))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _blocked("subprocess." + _name))
try:
    import socket
    socket.socket = _blocked("socket.socket")
    socket.create_connection = _blocked("socket.create_connection")
except ImportError:
    pass
_cwd = os.path.realpath(os.getcwd())
_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        path = os.path.realpath(os.fsdecode(file))
        if not (path == _cwd or path.startswith(_cwd + os.sep)):
            raise PermissionError(f"writing {path} outside the sandbox directory is blocked")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open
del _name
sys.argv = ["program.py"]
with _open("program.py") as _f:
    _code = compile(_f.read(), "program.py", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
'''


@dataclass
class SandboxResult:
    """Outcome of one program: ``status`` is passed (exit 0), failed (exception / nonzero exit), timeout,
    memory (MemoryError under the limit) or killed (a signal, e.g. the CPU or file-size limit)."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_mb: int, cpu_seconds: int, file_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        size = file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 4,
                max_output: int = 4000, python: str | None = None) -> SandboxResult:
    """Run ``code`` in a child Python process with limits; never raises for anything the program does.

    Args:
        code: a complete Python program (e.g. solution + tests + ``check(entry_point)``).
        timeout: wall-clock seconds before the child's process group is killed.
        memory_mb: address-space limit of the child (RLIMIT_AS).
        file_mb: largest file the child may write, its stdout/stderr included (RLIMIT_FSIZE).
        max_output: characters of stdout / stderr returned.
        python: interpreter (default: the current one).
    """
    with tempfile.TemporaryDirectory(prefix="zoo-sandbox-") as workdir:
        work = Path(workdir)
        (work / "program.py").write_text(code)
        started = time.perf_counter()
        with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
            process = subprocess.Popen(
                [python or sys.executable, "-I", "-c", GUARD], cwd=work, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"},
                start_new_session=True, close_fds=True,
                preexec_fn=_limits(memory_mb, int(timeout) + 1, file_mb),
            )
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole group: children it managed to start die too
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
        seconds = time.perf_counter() - started
        stdout = (work / "stdout.txt").read_bytes()[:max_output].decode("utf-8", "replace")
        stderr_bytes = (work / "stderr.txt").read_bytes()
        stderr = stderr_bytes[-max_output:].decode("utf-8", "replace")
    code_ = process.returncode
    if timed_out:
        status: Status = "timeout"
    elif code_ == 0:
        status = "passed"
    elif "MemoryError" in stderr:
        status = "memory"
    elif code_ is not None and code_ < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, code_, stdout, stderr, seconds)


def run_many(programs: list[str], workers: int = 2, **kwargs) -> list[SandboxResult]:
    """:func:`run_program` over many programs, ``workers`` child processes at a time, in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda code: run_program(code, **kwargs), programs))
