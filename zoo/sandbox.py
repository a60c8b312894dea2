"""Run generated Python behind an OS-enforced barrier, in a child process with limits.

:func:`run_program` writes the program into a fresh temporary directory and starts
``python -I -B -c LAUNCHER`` there (no ``preexec_fn``: the launcher confines itself, so starting it
from many threads is safe). Before the program's first line runs, the launcher installs, in this order:

* ``PR_SET_NO_NEW_PRIVS`` and an empty capability set (the zoo may run as root: the child keeps uid 0
  but loses every capability, e.g. to override file permissions, signal any process, or ptrace);
* **Landlock** (kernel LSM, ABI >= 1): write-type file access (write, truncate, create, remove, rename,
  link, make device/fifo/socket, execute) only beneath the temporary directory (plus writing
  ``/dev/null``); the Landlock domain also forbids ptrace-style access to processes outside it, so
  ``/proc/<pid>/environ``, ``/mem`` or ``/fd`` of the parent cannot be read. Where the kernel has
  them, TCP bind/connect (ABI >= 4), signals and abstract unix sockets outside the domain (ABI >= 6)
  are refused too;
* **seccomp** filters (a deny list, default allow; built once in the zoo process by libseccomp through
  ``pyseccomp``, loaded raw by the launcher): ``EPERM`` for process creation (fork, vfork, clone without ``CLONE_THREAD``,
  execve/execveat, so also ``subprocess``, ``os.system`` and ``_posixsubprocess.fork_exec``),
  signalling (kill, tgkill, pidfd_send_signal, ...), sockets (socket, socketpair, connect, bind,
  ...), ptrace and cross-process memory or limits, io_uring, mount / namespace / module / key /
  clock / identity syscalls, file metadata that Landlock does not cover (chmod, chown, utime,
  xattr), file locks and leases, SysV IPC and POSIX message queues, and the TIOCSTI/TIOCLINUX ioctls; ``ENOSYS``
  for clone3 (threads fall back to clone) and for every syscall number above :data:`NEWEST_SYSCALL`
  (469, Linux 6.17), so a syscall that a newer kernel adds does not open a hole in the deny list; a
  foreign syscall ABI (x32, i386) kills the process;
* resource limits: address space (``memory_mb``), CPU seconds, file size (``file_mb``: output and
  files it writes), no core dumps, 64 open files. The wall-clock timeout SIGKILLs the child's session.

The program then runs as module ``candidate`` (never ``__main__``), stdout/stderr go to files in the
temporary directory (returned truncated to ``max_output`` characters), and the environment is empty
but for ``PATH``/``LANG``/``OMP_NUM_THREADS``. A :class:`Program` with a ``test`` (a code task) runs the
completion, then the test code in the same namespace, compiled separately (a completion cannot swallow
it into a string or comment), takes ``check`` as the test defined it and calls it on ``entry_point``.

**Passing** needs exit code 0 *and* a per-run sentinel: a random nonce that the zoo hands to the
launcher through its stdin (replaced by ``/dev/null`` before the program starts) and that the launcher
writes to a pipe only the zoo reads, after ``check`` (or the whole program) returns. ``sys.exit(0)``,
``exit()`` or ``os._exit(0)`` before the end is therefore a failure, not a pass, and an
``if __name__ == "__main__":`` block never runs.

What the barrier is NOT: reads are not confined (the program can read any file the zoo process can, as
root any file, other processes' ``/proc`` entries excepted); the deny list is only as complete as its
syscall table; CPU and memory are limited per process, not by a cgroup;
and a program that sets out to forge a pass can (code in the same interpreter can find the launcher's
nonce in memory, trace ``check`` or return objects whose ``==`` is always true): the sentinel defeats
early exits, not an adversary gaming the score. It keeps the zoo's machine safe, not the score honest
against a deliberate attack. Needs Linux with seccomp filters, Landlock and ``libseccomp``
(``pip install pyseccomp``; Debian ``libseccomp2``); where one is missing, :func:`run_program` raises a
:class:`~zoo.errors.ZooError` unless ``ZOO_UNSAFE_SANDBOX=1`` allows running with what is available.

``python -m zoo.sandbox --measure`` prints the per-program cost and which layers this kernel supports.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zoo.errors import ZooError

Status = Literal["passed", "failed", "timeout", "memory", "killed"]

UNSAFE_ENV = "ZOO_UNSAFE_SANDBOX"
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
NEWEST_SYSCALL = 469  # file_setattr (Linux 6.17); syscall numbers >= 424 are the same on every arch
SETUP_FAILED = 97  # the launcher's exit code when a layer could not be installed

# ------------------------------------------------------------------------------------------ the filter
CLONE_THREAD = 0x00010000
_DENY = (
    # other programs and processes
    "fork", "vfork", "execve", "execveat",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease",
    "kcmp", "setpriority", "ioprio_set",
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # file metadata Landlock does not cover, locks, handles, io_uring (bypasses seccomp per operation)
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "utimensat", "futimesat", "setxattr", "lsetxattr", "fsetxattr", "removexattr",
    "lremovexattr", "fremovexattr", "setxattrat", "removexattrat", "file_setattr", "flock",
    "name_to_handle_at", "open_by_handle_at", "mknod", "mknodat",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # persistent IPC objects
    "shmget", "semget", "msgget", "mq_open", "mq_unlink",
    # mounts, namespaces, identity, kernel administration
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "open_tree_attr", "mount_setattr",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid",
    "setgroups", "capset", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "init_module",
    "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "sethostname",
    "setdomainname", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm",
    "userfaultfd", "personality", "syslog", "vhangup", "acct", "quotactl", "quotactl_fd", "swapon",
    "swapoff", "fanotify_init", "lookup_dcookie",
)
# syscalls that touch another process when their pid argument (arg 0) is not 0 (= the caller)
_DENY_OTHER_PID = ("prlimit64", "sched_setaffinity", "sched_setparam", "sched_setscheduler", "sched_setattr",
                   "migrate_pages", "move_pages")
# (syscall, argument index, values of that 32-bit argument that are refused)
_DENY_ARG = (("fcntl", 1, (6, 7, 37, 38, 1024)),  # F_SETLK, F_SETLKW, F_OFD_SETLK(W), F_SETLEASE
             ("ioctl", 1, (0x5412, 0x541C)))  # TIOCSTI (type into a terminal), TIOCLINUX
_ENOSYS = ("clone3", "openat2")  # struct arguments seccomp cannot inspect: callers fall back
# syscalls newer than libseccomp 2.5.4's table, by their (arch-independent) numbers
_NUMBERS = {"fchmodat2": 452, "setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467,
            "file_setattr": 469, "mount_setattr": 442, "quotactl_fd": 443, "process_mrelease": 448,
            "pidfd_getfd": 438, "pidfd_open": 434, "clone3": 435, "openat2": 437, "process_madvise": 440}


@functools.lru_cache(maxsize=1)
def seccomp_filters() -> tuple[bytes, bytes]:
    """The two BPF programs the launcher loads: libseccomp's deny list and a hand-written 6-instruction
    filter that answers ENOSYS to every syscall number above :data:`NEWEST_SYSCALL` (native ABI)."""
    import pyseccomp as sc

    native = sc.system_arch()
    filt = sc.SyscallFilter(sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)

    def rule(action: int, name: str, *args) -> None:
        number = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if number == -1:  # not in this libseccomp's table
            number = _NUMBERS.get(name)
            if number is None:
                return
        filt.add_rule(action, number, *args)

    eperm, enosys = sc.ERRNO(errno.EPERM), sc.ERRNO(errno.ENOSYS)
    for name in _DENY:
        rule(eperm, name)
    rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    for name in _DENY_OTHER_PID:
        rule(eperm, name, sc.Arg(0, sc.NE, 0))
    for name, index, values in _DENY_ARG:
        for value in values:
            rule(eperm, name, sc.Arg(index, sc.MASKED_EQ, 0xFFFFFFFF, value))
    for name in _ENOSYS:
        rule(enosys, name)
    with tempfile.TemporaryFile() as handle:
        filt.export_bpf(handle)
        handle.seek(0)
        deny_list = handle.read()
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    newer = b"".join(struct.pack("=HBBI", *ins) for ins in [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, 3, native),
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jge, 0, 1, NEWEST_SYSCALL + 1),
        (ret, 0, 0, enosys),
        (ret, 0, 0, sc.ALLOW)])
    return deny_list, newer


# ------------------------------------------------------------------------------------------ the launcher
LAUNCHER = r'''
import ctypes, os, resource, sys, types
def _setup(landlock_abi, filters, workdir):
    if not sys.platform.startswith("linux"):  # only reachable with ZOO_UNSAFE_SANDBOX=1: limits alone
        return
    libc = ctypes.CDLL(None, use_errno=True)
    def check(result, what):
        if result < 0:
            raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))
        return result
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    caps = (ctypes.c_uint32 * 6)()  # two empty {effective, permitted, inheritable} sets
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), caps), "capset")
    if landlock_abi:
        class Ruleset(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
        write = 1 << 1 | 1 << 4 | 1 << 5 | 0x1FC0  # write file, remove dir/file, make char..sym
        write |= (1 << 13 if landlock_abi >= 2 else 0) | (1 << 14 if landlock_abi >= 3 else 0)  # refer, truncate
        ruleset = Ruleset(write | 1, 3 if landlock_abi >= 4 else 0, 3 if landlock_abi >= 6 else 0)
        fd = check(libc.syscall(444, ctypes.byref(ruleset), ctypes.sizeof(ruleset), 0), "landlock_create_ruleset")
        for path, allowed in ((workdir, write), (os.devnull, 1 << 1 | (1 << 14 if landlock_abi >= 3 else 0))):
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = PathBeneath(allowed, target)
            check(libc.syscall(445, fd, 1, ctypes.byref(rule), 0), "landlock_add_rule " + path)
            os.close(target)
        check(libc.syscall(446, fd, 0), "landlock_restrict_self")
        os.close(fd)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    for bpf in filters:
        buffer = ctypes.create_string_buffer(bpf, len(bpf))
        check(libc.prctl(22, 2, ctypes.byref(Fprog(len(bpf) // 8, ctypes.addressof(buffer))), 0, 0),
              "PR_SET_SECCOMP")
def _main():
    report, memory_mb, cpu_seconds, file_mb, landlock_abi = map(int, sys.argv[1:6])
    entry_point = sys.argv[6]
    payload = b""
    while chunk := os.read(0, 1 << 16):
        payload += chunk
    nonce, *filters = payload.split(b"\n")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        _setup(landlock_abi, [bytes.fromhex(f.decode()) for f in filters if f], os.getcwd())
    except Exception as error:
        os.write(report, ("error: %s\n" % error).encode())
        os._exit(97)
    os.write(report, b"ready\n")
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, file_mb << 20),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)):
        resource.setrlimit(limit, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    with open("program.py") as f:
        program = compile(f.read(), "program.py", "exec")
    test = None
    if entry_point:
        with open("test.py") as f:
            test = compile(f.read(), "test.py", "exec")
    module = types.ModuleType("candidate")
    module.__file__ = os.path.abspath("program.py")
    sys.modules["candidate"] = module
    sys.argv = ["program.py"]
    namespace = module.__dict__
    exec(program, namespace)
    if test is not None:
        namespace.pop("check", None)
        exec(test, namespace)
        check, candidate = namespace["check"], namespace[entry_point]
        check(candidate)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(report, nonce)
    os._exit(0)
_main()
'''


# ------------------------------------------------------------------------------------------ support
def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: no Landlock)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, version)


def seccomp_problem() -> str | None:
    """Why seccomp filters cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return f"seccomp needs Linux (this is {sys.platform})"
    if not Path("/proc/sys/kernel/seccomp/actions_avail").exists():
        return "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
    try:
        seccomp_filters()
    except ImportError:
        return "pyseccomp is not installed (`pip install pyseccomp`)"
    except (RuntimeError, OSError) as error:  # pyseccomp raises RuntimeError when libseccomp is missing
        return f"libseccomp is unusable ({error}; Debian: `apt-get install libseccomp2`)"
    return None


@functools.lru_cache(maxsize=1)
def layers() -> tuple[int, tuple[bytes, ...]]:
    """(Landlock ABI to use, seccomp filters to load): raises ZooError when a layer is missing, unless
    ``ZOO_UNSAFE_SANDBOX=1`` (then runs with what is available and warns once)."""
    abi, problem = landlock_abi(), seccomp_problem()
    missing = ([] if abi else ["Landlock (kernel >= 5.13 with landlock in the lsm= list)"]) + (
        [problem] if problem else [])
    if missing:
        if os.environ.get(UNSAFE_ENV) != "1":
            raise ZooError(f"the code sandbox cannot confine generated programs here: missing "
                           f"{'; '.join(missing)}. Run on a kernel that has it, or set {UNSAFE_ENV}=1 to run "
                           f"generated code with only the layers available")
        warnings.warn(f"{UNSAFE_ENV}=1: generated code runs without {'; '.join(missing)}", stacklevel=3)
    return abi, () if problem else seccomp_filters()


# ------------------------------------------------------------------------------------------ running
@dataclass(frozen=True)
class Program:
    """A program to run: ``source`` alone, or (code tasks) ``source`` then ``test`` in the same namespace,
    then the ``check`` that ``test`` defines called on the function ``entry_point``."""

    source: str
    test: str = ""
    entry_point: str = ""


@dataclass
class SandboxResult:
    """Outcome of one program: ``status`` is passed (exit 0 after reaching the end of the program or of
    ``check``), failed (an exception, a nonzero exit, or an exit before the end), timeout, memory
    (MemoryError under the limit) or killed (a signal, e.g. the CPU or file-size limit)."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    completed: bool = False  # the launcher's sentinel arrived: the program (or check) ran to its end

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(code: str | Program, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 4,
                max_output: int = 4000, python: str | None = None) -> SandboxResult:
    """Run ``code`` in a confined child Python process; never raises for anything the program does.

    Args:
        code: a complete Python program, or a :class:`Program` (completion + test + entry point).
        timeout: wall-clock seconds before the child's session is killed.
        memory_mb: address-space limit of the child (RLIMIT_AS).
        file_mb: largest file the child may write, its stdout/stderr included (RLIMIT_FSIZE).
        max_output: characters of stdout / stderr returned.
        python: interpreter (default: the current one).

    Raises:
        ZooError: the barrier cannot be installed on this machine (see the module docstring).
    """
    abi, filters = layers()
    program = code if isinstance(code, Program) else Program(code)
    nonce = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="zoo-sandbox-") as workdir:
        work = Path(workdir)
        (work / "program.py").write_text(program.source)
        if program.entry_point:
            (work / "test.py").write_text(program.test)
        read_end, write_end = os.pipe()
        started = time.perf_counter()
        try:
            with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
                try:
                    process = subprocess.Popen(
                        [python or sys.executable, "-I", "-B", "-c", LAUNCHER, str(write_end), str(memory_mb),
                         str(int(timeout) + 1), str(file_mb), str(abi), program.entry_point],
                        cwd=work, stdin=subprocess.PIPE, stdout=out, stderr=err, env=ENV, close_fds=True,
                        pass_fds=(write_end,), start_new_session=True)
                finally:
                    os.close(write_end)
                try:  # far below a pipe's buffer: never blocks, even if the child is already gone
                    process.stdin.write(b"\n".join([nonce, *(f.hex().encode() for f in filters)]))
                    process.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                timed_out = False
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    try:  # the whole session, whatever it managed to leave behind
                        os.killpg(process.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    process.wait()
            os.set_blocking(read_end, False)
            report = b""
            try:
                while chunk := os.read(read_end, 1 << 16):
                    report += chunk
            except BlockingIOError:
                pass
        finally:
            os.close(read_end)
        seconds = time.perf_counter() - started
        stdout = (work / "stdout.txt").read_bytes()[:max_output].decode("utf-8", "replace")
        stderr = (work / "stderr.txt").read_bytes()[-max_output:].decode("utf-8", "replace")
    if report.startswith(b"error: ") and process.returncode == SETUP_FAILED:
        raise ZooError(f"the code sandbox could not install its barrier ({report[7:].decode().strip()}); "
                       f"set {UNSAFE_ENV}=1 to run generated code without it")
    returncode = process.returncode
    completed = report == b"ready\n" + nonce
    if timed_out:
        status: Status = "timeout"
    elif returncode == 0 and completed:
        status = "passed"
    elif "MemoryError" in stderr:
        status = "memory"
    elif returncode is not None and returncode < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, returncode, stdout, stderr, seconds, completed)


def run_many(programs: list[str | Program], workers: int = 2, **kwargs) -> list[SandboxResult]:
    """:func:`run_program` over many programs, each run once, ``workers`` at a time, in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda code: run_program(code, **kwargs), programs))


def measure(count: int = 20) -> dict[str, object]:
    """Mean wall milliseconds per trivial program, one at a time (the barrier's cost)."""
    programs = [f"def f(x):\n    return x + {i}\nassert f(1) == {i + 1}\n" for i in range(count)]
    run_program(programs[0])  # warm the page cache and the filter
    started = time.perf_counter()
    results = [run_program(p) for p in programs]
    elapsed = time.perf_counter() - started
    return {"programs": count, "passed": sum(r.passed for r in results),
            "mean_ms": round(1000 * elapsed / count, 1), "landlock_abi": layers()[0],
            "seccomp_filters": len(layers()[1]), "python": sys.version.split()[0]}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="The code sandbox: its cost and this kernel's layers.")
    parser.add_argument("--measure", action="store_true", help="time trivial programs through the sandbox")
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(measure(args.count) if args.measure else {"landlock_abi": landlock_abi(),
                                                               "seccomp": seccomp_problem() or "ok"}))
