"""The code sandbox: hostile programs are contained by the OS and score as failed; good ones pass.

The catalogue below holds one hostile program per way out (early exits, ``__main__`` blocks, writes
through ``os.open`` / ``io.FileIO`` / ctypes, sockets, fork / exec / ``_posixsubprocess``, bombs,
the parent's environment, signals to the parent, a fake ``check``): each must fail, and where it
would leave a trace (a file, a dead parent) the test looks for that trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from zoo import sandbox
from zoo.errors import ZooError
from zoo.sandbox import Program, run_many, run_program

# A code task in HumanEval's shape: the completion defines `add`, the test defines `check`.
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 0\n"


def task(completion: str) -> Program:
    return Program(completion, TEST, "add")


# ----------------------------------------------------------------------------- positive controls
def test_correct_solution_passes():
    result = run_program(task(GOOD), timeout=5)
    assert result.passed and result.completed and result.returncode == 0, result


def test_correct_solution_that_prints_a_lot_passes_within_the_limits():
    noisy = GOOD + "for i in range(20000):\n    print('line', i)\n"  # about 220 KB of output
    result = run_program(task(noisy), timeout=5, file_mb=1, max_output=50)
    assert result.passed, result
    assert result.stdout == "".join(f"line {i}\n" for i in range(20000))[:50]


def test_plain_program_passes_and_output_is_captured():
    result = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')\n", timeout=5)
    assert result.passed and result.returncode == 0 and result.stdout.strip() == "ok"


def test_threads_and_files_inside_the_directory_still_work():
    code = ("import threading\nout = []\nt = threading.Thread(target=out.append, args=(7,))\nt.start()\nt.join()\n"
            "open('inside.txt', 'w').write(str(out[0]))\nprint(open('inside.txt').read())\n")
    result = run_program(code, timeout=5)
    assert result.passed and result.stdout.strip() == "7", result


def test_exception_is_reported_as_failed_with_traceback():
    result = run_program("def f():\n    raise ValueError('boom')\nf()\n", timeout=5)
    assert result.status == "failed" and not result.passed
    assert "ValueError: boom" in result.stderr and "program.py" in result.stderr


# ----------------------------------------------------------------------------- hostile catalogue
# (id, completion or program with {outside} / {marker} placeholders, is it a code task)
EXITS = {
    "sys_exit_0": WRONG + "import sys\nsys.exit(0)\n",
    "exit_builtin": WRONG + "exit()\n",
    "quit_builtin": WRONG + "quit(0)\n",
    "os_exit_0": WRONG + "import os\nos._exit(0)\n",
    "raise_systemexit": WRONG + "raise SystemExit\n",
    "main_block": WRONG + "if __name__ == '__main__':\n    import sys\n    sys.exit(0)\n",
    "fake_check": WRONG + "def check(candidate):\n    pass\n",
    "fake_check_and_exit": WRONG + "def check(candidate):\n    import os\n    os._exit(0)\ncheck(add)\n",
    "atexit_os_exit": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
}


@pytest.mark.parametrize("completion", EXITS.values(), ids=EXITS.keys())
def test_exits_and_fake_checks_after_a_wrong_body_fail(completion):
    result = run_program(task(completion), timeout=5)
    assert not result.passed and result.status == "failed" and not result.completed, result


def test_completion_does_not_run_as_main():
    result = run_program(task(GOOD + "print(__name__)\n"), timeout=5)
    assert result.passed and result.stdout.strip() not in ("", "__main__"), result


WRITES = {
    "os_open": "import os\nfd = os.open({outside!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
    "io_fileio": "import io\nio.FileIO({outside!r}, 'w').write(b'x')\n",
    "builtin_open": "open({outside!r}, 'w').write('x')\n",
    "ctypes_libc": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "fd = libc.open({outside!r}.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
                    "if fd < 0:\n    raise PermissionError(ctypes.get_errno(), 'libc open')\nlibc.write(fd, b'x', 1)\n"),
    "symlink": "import os\nos.symlink('/etc/passwd', {outside!r})\n",
    "mkdir": "import os\nos.mkdir({outside!r})\n",
}


@pytest.mark.parametrize("code", WRITES.values(), ids=WRITES.keys())
def test_writes_outside_the_directory_are_refused_and_leave_nothing(code, tmp_path):
    outside = tmp_path / "outside"
    result = run_program(code.format(outside=str(outside)), timeout=5)
    assert result.status == "failed" and "PermissionError" in result.stderr, result
    assert not outside.exists() and not outside.is_symlink()


# Each would print RAN from a new process (its stdout is the sandbox's): RAN must never appear.
SPAWNS = {
    "os_system": "import os\nstatus = os.system('echo RAN')\nraise PermissionError(status)\n",
    "os_execv": "import os\nos.execv('/bin/echo', ['echo', 'RAN'])\n",
    "os_posix_spawn": "import os\nos.posix_spawn('/bin/echo', ['echo', 'RAN'], {{}})\n",
    "subprocess_run": "import subprocess\nsubprocess.run(['echo', 'RAN'], check=True)\n",
    "posixsubprocess_fork_exec": (
        "import _posixsubprocess, os, time\nr, w = os.pipe()\n"
        "_posixsubprocess.fork_exec([b'/bin/echo', b'RAN'], [b'/bin/echo'], True, (w,), None, None,"
        " -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\ntime.sleep(0.3)\n"),
    "os_fork": "import os\nif os.fork() == 0:\n    os.write(1, b'RAN')\n",
    "ctypes_fork": ("import ctypes, os\npid = ctypes.CDLL(None).fork()\nif pid == 0:\n    os.write(1, b'RAN')\n"
                    "    os._exit(0)\nif pid < 0:\n    raise PermissionError('fork refused')\n"),
    "ctypes_execv": ("import ctypes\nargv = (ctypes.c_char_p * 3)(b'echo', b'RAN', None)\n"
                     "ctypes.CDLL(None).execv(b'/bin/echo', argv)\nraise PermissionError('execv refused')\n"),
}


@pytest.mark.parametrize("code", SPAWNS.values(), ids=SPAWNS.keys())
def test_no_other_program_or_process_starts(code):
    result = run_program(code.format(), timeout=5)
    assert result.status == "failed" and "PermissionError" in result.stderr, result
    assert "RAN" not in result.stdout


def test_deleting_renaming_or_chmodding_outside_files_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    code = textwrap.dedent(f"""
        import os, shutil
        attempts = [lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),
                    lambda: os.rename({str(victim)!r}, 'stolen'), lambda: os.chmod({str(victim)!r}, 0o777),
                    lambda: os.truncate({str(victim)!r}, 0), lambda: os.utime({str(victim)!r}, (0, 0))]
        for attempt in attempts:
            try:
                attempt()
                print('done')
            except PermissionError:
                print('refused')
        """)
    result = run_program(code, timeout=5)
    assert result.passed and result.stdout.split() == ["refused"] * 6, result
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644
    assert victim.stat().st_mtime > 0


SOCKETS = {
    "socket_module": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
    "underscore_socket": "import _socket\n_socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)\n",
    "unix_socketpair": "import _socket\n_socket.socketpair()\n",
    "ctypes_socket": ("import ctypes\nfd = ctypes.CDLL(None).socket(2, 1, 0)\n"
                      "assert fd >= 0, 'socket refused'\n"),
}


@pytest.mark.parametrize("code", SOCKETS.values(), ids=SOCKETS.keys())
def test_sockets_cannot_be_opened(code):
    result = run_program(code, timeout=5)
    assert result.status == "failed" and ("PermissionError" in result.stderr or "refused" in result.stderr), result


def test_fork_bomb_is_refused_at_every_fork():
    # bounded even if a fork got through: each child leaves at once, so no test run can take the machine down
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None)\npids = []\nfor _ in range(200):\n    pid = libc.fork()\n"
            "    if pid == 0:\n        os._exit(0)\n    pids.append(pid)\nassert max(pids) > 0, sorted(set(pids))\n")
    result = run_program(code, timeout=5)
    assert result.status == "failed" and "AssertionError: [-1]" in result.stderr, result


def test_memory_bomb_is_stopped_by_the_limit():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    result = run_program(bomb, timeout=10, memory_mb=300)
    assert result.status in ("memory", "killed") and not result.passed, result


def test_output_bomb_is_bounded_by_the_file_size_limit():
    result = run_program("while True:\n    print('x' * 10000)\n", timeout=10, file_mb=1, max_output=100)
    assert result.status in ("killed", "failed") and len(result.stdout) == 100


def test_infinite_loop_times_out_and_is_killed():
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and result.returncode is not None and result.returncode < 0


PARENT = """
import json, sys
from zoo.sandbox import run_program
programs = json.loads(sys.argv[1])
print(json.dumps([[r.status, r.stdout, r.stderr[-300:]] for r in map(lambda p: run_program(p, timeout=5), programs)]))
print("alive")
"""


def test_parent_environment_and_life_are_out_of_reach():
    """Through an intermediate parent that holds a secret in its environment (``/proc/<pid>/environ`` shows
    the environment a process started with): the child cannot read it, and cannot kill that parent."""
    secret = "zoo-secret-" + os.urandom(8).hex()
    read_env = textwrap.dedent("""
        import os
        ppid = os.getppid()
        print(os.environ.get('ZOO_SECRET'))
        for path in (f'/proc/{ppid}/environ', f'/proc/{ppid}/task/{ppid}/environ', f'/proc/{ppid}/mem'):
            try:
                print(open(path, 'rb').read(4096))
            except OSError as error:
                print(type(error).__name__)
        """)
    kills = ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
             "import ctypes, os\nassert ctypes.CDLL(None).kill(os.getppid(), 9) == 0\n",
             "import os\nos.killpg(os.getpgid(os.getppid()), 9)\n"]
    done = subprocess.run([sys.executable, "-c", PARENT, json.dumps([read_env, *kills])], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "ZOO_SECRET": secret}, start_new_session=True)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "alive", (done.returncode, done.stderr[-2000:])
    results = json.loads(done.stdout.splitlines()[-2])
    env_status, env_out, _ = results[0]
    assert secret not in env_out and env_out.split()[0] == "None", env_out
    assert env_out.split()[1:] == ["PermissionError"] * 3, env_out
    assert [status for status, _, _ in results[1:]] == ["failed"] * 3, results


# ----------------------------------------------------------------------------- mechanics
def test_runs_in_a_separate_process_and_temporary_directory():
    result = run_program("import os\nprint(os.getpid(), os.getcwd())\n", timeout=5)
    pid, cwd = result.stdout.split()
    assert int(pid) != os.getpid() and "zoo-sandbox-" in cwd and not os.path.exists(cwd)


def test_run_many_keeps_order_and_never_uses_preexec_fn(monkeypatch):
    calls = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    results = run_many(["print(1)", "raise SystemExit(3)", "print(3)"], workers=2, timeout=5)
    assert [r.status for r in results] == ["passed", "failed", "passed"] and results[1].returncode == 3
    assert len(calls) == 3 and all(call.get("preexec_fn") is None for call in calls)


def test_missing_kernel_layer_refuses_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    sandbox.layers.cache_clear()
    try:
        with pytest.raises(ZooError, match="ZOO_UNSAFE_SANDBOX=1"):
            run_program("print(1)")
        sandbox.layers.cache_clear()
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
        with pytest.warns(UserWarning, match="without Landlock"):
            assert run_program("print(1)", timeout=5).passed
    finally:
        sandbox.layers.cache_clear()


def test_filter_refuses_syscalls_newer_than_the_list():
    code = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(470), ctypes.get_errno())\n"
    result = run_program(code, timeout=5)
    assert result.stdout.split() == ["-1", "38"], result  # ENOSYS from the filter, whatever the kernel has
