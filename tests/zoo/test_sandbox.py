"""The code sandbox: every bad program is contained in its child process, a good one passes."""

from __future__ import annotations

import os
import time

from zoo.sandbox import run_many, run_program


def test_passing_program_passes_and_output_is_captured():
    result = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')\n", timeout=10)
    assert result.passed and result.returncode == 0 and result.stdout.strip() == "ok"


def test_exception_is_reported_as_failed_with_traceback():
    result = run_program("def f():\n    raise ValueError('boom')\nf()\n", timeout=10)
    assert result.status == "failed" and not result.passed
    assert "ValueError: boom" in result.stderr and "program.py" in result.stderr


def test_infinite_loop_times_out_and_is_killed():
    started = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and result.returncode is not None and result.returncode < 0
    assert time.perf_counter() - started < 20  # contained: returns, the zoo process is not blocked


def test_sleeping_child_timeout_is_contained():
    result = run_program("import time\ntime.sleep(60)\n", timeout=1.0)
    assert result.status == "timeout"


def test_memory_bomb_is_stopped_by_the_limit():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    result = run_program(bomb, timeout=20, memory_mb=300)
    assert result.status in ("memory", "killed"), result
    assert not result.passed


def test_os_system_and_subprocess_are_blocked(tmp_path):
    marker = tmp_path / "marker"
    code = (f"import os, subprocess\ntry:\n    os.system('touch {marker}')\nexcept PermissionError:\n    print('blocked')\n"
            f"subprocess.run(['touch', '{marker}'])\n")
    result = run_program(code, timeout=10)
    assert result.stdout.strip() == "blocked" and result.status == "failed"
    assert "PermissionError" in result.stderr
    assert not marker.exists()


def test_deleting_or_overwriting_outside_files_is_blocked(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    code = (f"import os, shutil\nfor fn in (lambda: os.remove('{victim}'), lambda: shutil.rmtree('{tmp_path}'),\n"
            f"           lambda: open('{victim}', 'w')):\n    try:\n        fn()\n    except PermissionError:\n"
            f"        print('blocked')\nopen('inside.txt', 'w').write('fine')\n")
    result = run_program(code, timeout=10)
    assert result.passed, result
    assert result.stdout.split() == ["blocked"] * 3
    assert victim.read_text() == "precious"


def test_runs_in_a_separate_process_and_temporary_directory():
    result = run_program("import os\nprint(os.getpid(), os.getcwd())\n", timeout=10)
    pid, cwd = result.stdout.split()
    assert int(pid) != os.getpid() and "zoo-sandbox-" in cwd and not os.path.exists(cwd)


def test_run_many_keeps_order():
    results = run_many(["print(1)", "raise SystemExit(3)", "print(3)"], workers=2, timeout=10)
    assert [r.status for r in results] == ["passed", "failed", "passed"] and results[1].returncode == 3


def test_output_flood_is_bounded_by_the_file_size_limit():
    result = run_program("while True:\n    print('x' * 10000)\n", timeout=20, file_mb=1, max_output=100)
    assert result.status in ("killed", "failed") and len(result.stdout) == 100
