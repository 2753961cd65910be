"""The code sandbox and pass@k: every hostile completion is contained and scored as a failure while
the harness survives; canonical solutions pass and wrong ones fail; pass@k agrees with counting
subsets.

Attacks run with the guard (the in-process prelude) and without it. Without it, only the operating
system contains them, so those runs are skipped on a machine where the layer that stops an attack is
missing (`sandbox_info()`: not root, so no separate user; no user namespaces). Those runs are not
skipped on a machine that runs the tests as root with namespaces."""

import itertools
import math
import os
import pwd
import random
import secrets
import signal
import socket
import time
from fractions import Fraction
from pathlib import Path

import pytest

from minillm.sandbox import (
    OUTPUT_LIMIT,
    PROBLEMS,
    check_correctness,
    evaluate_pass_at_k,
    pass_at_k,
    run_code,
    sandbox_info,
    truncate_completion,
)

INFO = sandbox_info()
# the child cannot touch our files or processes
OTHER_USER = INFO["user"] != pwd.getpwuid(os.getuid()).pw_name
NAMESPACES = bool(INFO["namespaces"])  # no network; own PID space; its descendants die with it
GUARD = [pytest.param(True, id="guard"), pytest.param(False, id="no-guard")]


def _needs(guard: bool, guard_suffices: bool, available: bool, what: str):
    if not available and not (guard and guard_suffices):
        pytest.skip(f"this machine's sandbox lacks {what}: {INFO}")


def _processes_with(marker: str) -> list[int]:
    "Live (non-zombie) processes whose command line contains `marker`."
    found = []
    for d in os.listdir("/proc"):
        try:
            if not d.isdigit() or marker not in Path(f"/proc/{d}/cmdline").read_bytes().decode(
                errors="replace"
            ):
                continue
            if Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(d))
        except OSError:
            pass
    return found


def _none_left(marker: str, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _processes_with(marker)


def _attack(completion: str, guard: bool, timeout: float = 2.0, **limits):
    "A hostile completion of the first problem; it must never pass."
    r = check_correctness(PROBLEMS[0], completion, timeout=timeout, guard=guard, **limits)
    assert r.status != "passed", r
    return r


# --- the problems
# ------------------------------------------------------------------------------------------------


def test_canonical_solutions_score_pass_at_1_of_one():
    canonical = {p["prompt"]: p["canonical_solution"] for p in PROBLEMS}
    scores = evaluate_pass_at_k(
        PROBLEMS, lambda prompt, n: [canonical[prompt]] * n, n=2, ks=(1, 2), timeout=30
    )
    assert scores["pass@1"] == scores["pass@2"] == 1.0
    assert scores["correct"] == {p["task_id"]: 2 for p in PROBLEMS}


def test_problems_are_well_formed():
    assert 10 <= len(PROBLEMS) <= 20 and len({p["task_id"] for p in PROBLEMS}) == len(PROBLEMS)
    for p in PROBLEMS:
        assert set(p) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
        assert p["prompt"].startswith(f"def {p['entry_point']}(") and p["prompt"].rstrip().endswith(
            '"""'
        )
        assert all(line.startswith("    ") for line in p["canonical_solution"].splitlines() if line)
        assert p["test"].startswith("def check(candidate):") and p["test"].count("assert") >= 5


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p["entry_point"] for p in PROBLEMS])
def test_return_none_fails_every_problem(problem):
    r = check_correctness(problem, "    return None\n", timeout=30)
    assert r.status == "failed" and "AssertionError" in r.stderr


@pytest.mark.parametrize(
    "task, completion",
    [
        ("title_case", "    return title.title()\n"),  # capitalises "and"
        (
            "merge_intervals",
            "    merged = []\n    for s, e in sorted(intervals):\n"
            "        if merged and s < merged[-1][1]:\n"
            "            merged[-1] = (merged[-1][0], max(merged[-1][1], e))\n        else:\n"
            "            merged.append((s, e))\n    return merged\n",
        ),  # does not merge touching intervals
        (
            "roman_to_int",
            "    v = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}\n"
            "    return sum(v[c] for c in numeral)\n",
        ),  # no subtractive forms
        (
            "nth_prime",
            "    primes = [p for p in range(2, 10000) if all(p % d for d in range(2, p))]\n"
            "    return primes[n]\n",
        ),  # off by one
        (
            "second_largest",
            "    return sorted(numbers)[-2] if len(numbers) > 1 else None\n",
        ),  # not distinct
        (
            "word_counts",
            "    counts = {}\n    for w in text.lower().split():\n"
            "        counts[w] = counts.get(w, 0) + 1\n"
            "    return counts\n",
        ),  # keeps punctuation
    ],
)
def test_plausible_wrong_solutions_fail(task, completion):
    problem = next(p for p in PROBLEMS if p["entry_point"] == task)
    assert check_correctness(problem, completion, timeout=30).status == "failed"


def test_the_score_needs_the_tests_to_finish():
    # run_code only sees the exit code ...
    assert run_code("import sys; sys.exit(0)").status == "passed"
    for early in [
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
        "    return 0\n\nraise SystemExit(0)\n",
    ]:
        # ... check_correctness also needs the marker after the tests
        r = check_correctness(PROBLEMS[0], early)
        assert (
            r.status == "failed" and r.returncode == 0 and "before its tests finished" in r.stderr
        )
    r = check_correctness(
        PROBLEMS[0], PROBLEMS[0]["canonical_solution"] + "    print('talkative')\n", timeout=30
    )
    # the marker line is removed; the unreachable print never ran
    assert r.passed and r.stdout == ""


ALWAYS_EQUAL = (
    "    class AlwaysEqual:\n"
    "        def __eq__(self, other):\n"
    "            return True\n"
    "    return AlwaysEqual()\n"
)


@pytest.mark.parametrize(
    "completion",
    [
        ALWAYS_EQUAL,  # equal to 7, to 0, to 10 and to 1: every `==` test
        "    class Seven(int):\n        def __eq__(self, other):\n            return True\n"
        "    return Seven(7)\n",  # a subclass of a builtin type
    ],
    ids=["object", "int-subclass"],
)
def test_an_object_that_equals_everything_fails(completion):
    namespace = {}  # run in this process, as the chapter's passes_trusted does, it passes
    exec(PROBLEMS[0]["prompt"] + completion + "\n" + PROBLEMS[0]["test"], namespace)
    namespace["check"](namespace["count_vowels"])
    r = check_correctness(PROBLEMS[0], completion, timeout=30)
    assert r.status == "failed" and "is not a builtin type" in r.stderr, r


def test_an_object_that_equals_everything_fails_inside_a_container():
    problem = next(p for p in PROBLEMS if p["entry_point"] == "run_length_encode")
    completion = ALWAYS_EQUAL.replace("return AlwaysEqual()", "return [AlwaysEqual()]")
    r = check_correctness(problem, completion, timeout=30)
    assert r.status == "failed" and "AlwaysEqual is not a builtin type" in r.stderr, r


def test_results_of_builtin_types_still_pass():
    # every canonical solution returns builtin values: ints, strings, bools, None, lists, tuples,
    # dicts; the plain-value check lets them through (also nested ones, as flatten's)
    problem = next(p for p in PROBLEMS if p["entry_point"] == "flatten")
    assert check_correctness(problem, problem["canonical_solution"], timeout=30).passed


# --- run_code
# ------------------------------------------------------------------------------------------------


def test_statuses():
    ok = run_code("print(6 * 7)", timeout=30)
    assert (ok.status, ok.returncode, ok.stdout, ok.stderr) == ("passed", 0, "42\n", "")
    bad = run_code("1 / 0", timeout=30)
    assert (
        bad.status == "failed"
        and bad.returncode == 1
        and bad.stderr.strip().endswith("ZeroDivisionError: division by zero")
    )
    # tracebacks name the program, not a temporary path
    assert 'File "program.py", line 1' in bad.stderr
    crash = run_code("import ctypes; ctypes.string_at(0)", timeout=30)
    assert crash.status == "error" and crash.returncode == -signal.SIGSEGV
    syntax = run_code("def f(:\n", timeout=30)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_bad_limits_are_refused():
    for bad in [dict(timeout=0), dict(memory_mb=0), dict(max_procs=-1), dict(max_file_mb=0)]:
        with pytest.raises(ValueError, match="must be positive"):
            run_code("pass", **bad)


def test_waiting_without_pidfd(monkeypatch):
    # an older kernel or Python: Popen.wait polls
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    assert run_code("print(1)", timeout=30).stdout == "1\n"
    start = time.monotonic()
    assert (
        run_code("while True: pass", timeout=1).status == "timeout"
        and time.monotonic() - start < 1 + 5
    )


def test_child_environment_is_clean_and_fresh(monkeypatch):
    monkeypatch.setenv("MINILLM_SECRET", "hunter2")
    r = run_code(
        "import os, json, re, math, collections, itertools, functools\n"
        "print(sorted(os.environ))\n"
        "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\n"
        "print(os.listdir('.')); open('scratch.txt', 'w').write('ok')\n"
        "print(open('scratch.txt').read())\n",
        timeout=30,
    )
    assert r.passed, r
    assert r.stdout.splitlines() == ["['HOME', 'LANG', 'PATH', 'TMPDIR']", "True", "[]", "ok"]
    again = run_code("import os; print(os.listdir('.'))", timeout=30)
    assert again.stdout == "[]\n"  # every run gets a new directory


def test_limits_leave_room_for_ordinary_programs():
    # 64 MiB under the 256 MiB limit
    r = run_code("x = bytearray(64 << 20); print(len(x) >> 20)", timeout=30)
    assert r.passed and r.stdout == "64\n"
    assert run_code("x = bytearray(64 << 20)", memory_mb=32, timeout=30).status == "failed"


def test_output_is_capped():
    r = run_code(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n", timeout=10, max_file_mb=1
    )
    assert r.status == "failed" and "File too large" in r.stderr  # RLIMIT_FSIZE applies to stdout
    assert len(r.stdout) <= OUTPUT_LIMIT


@pytest.mark.skipif(
    os.getuid() != 0, reason="the harness is not root: the child runs as the same user"
)
def test_child_is_not_root(tmp_path):
    secret = tmp_path / "root-only.txt"
    secret.write_text("root's eyes only")
    secret.chmod(0o600)
    r = run_code(f"print(open({str(secret)!r}).read())", timeout=30)
    assert r.status == "failed" and "PermissionError" in r.stderr and "root's eyes" not in r.stdout


# --- hostile completions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guard", GUARD)
def test_infinite_loop_is_killed_at_the_deadline(guard):
    start = time.monotonic()
    r = _attack("    while True:\n        pass\n", guard, timeout=1)
    assert r.status == "timeout" and time.monotonic() - start < 1 + 5


@pytest.mark.parametrize("guard", GUARD)
def test_fork_bomb_is_contained_and_leaves_nothing(guard):
    marker = f"bomb-{secrets.token_hex(6)}"
    if guard:  # os.fork raises PermissionError, an OSError: the bomb spins in place
        bomb = (
            "    import os\n    while True:\n        try:\n            os.fork()\n"
            "        except OSError:\n            pass\n"
        )
    # a real bomb, in an interpreter whose command line carries a marker we can look for afterwards
    else:
        _needs(
            guard,
            True,
            OTHER_USER or NAMESPACES,
            "a separate user or namespaces (RLIMIT_NPROC would count ours)",
        )
        src = (
            "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            "            print('+', flush=True)\n"
            "    except OSError:\n        pass\n"
        )
        bomb = (
            "    import os, sys\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', {src!r}, {marker!r}])\n"
        )
    r = _attack(bomb, guard, timeout=2, max_procs=16)
    assert r.status == "timeout"
    if not guard:
        assert 1 <= r.stdout.count("+") <= 16  # it did fork, and RLIMIT_NPROC held it
        assert _none_left(marker), f"fork bomb processes survived: {_processes_with(marker)}"


@pytest.mark.parametrize("guard", GUARD)
def test_a_process_that_leaves_the_group_is_killed(guard):
    _needs(guard, True, NAMESPACES, "a PID namespace (os.setsid escapes the process-group kill)")
    marker = f"{random.randrange(10**6)}.{random.randrange(10**6)}"
    r = _attack(
        "    import os\n    if os.fork() == 0:\n        os.setsid()\n"
        f"        os.execv('/bin/sleep', ['sleep', {marker!r}])\n",
        guard,
    )
    assert r.status == "failed"
    assert _none_left(marker), "a sandboxed process survived its run"


@pytest.mark.parametrize("guard", GUARD)
def test_memory_bomb_gets_memory_error(guard):
    r = _attack(
        "    blocks = []\n    while True:\n        blocks.append(bytearray(1 << 24))\n", guard
    )
    assert r.status == "failed" and "MemoryError" in r.stderr


@pytest.mark.parametrize("guard", GUARD)
def test_disk_filler_stops_at_the_file_size_limit(guard):
    r = _attack(
        "    with open('big', 'wb') as f:\n"
        "        while True:\n            f.write(bytes(1 << 20))\n",
        guard,
        max_file_mb=4,
    )
    assert r.status == "failed" and "File too large" in r.stderr


@pytest.mark.parametrize("guard", GUARD)
@pytest.mark.parametrize("target", ["parent", "harness"])
def test_writing_outside_its_directory_fails(guard, target, tmp_path):
    _needs(guard, False, OTHER_USER, "a separate user (the child could write our files)")
    notes = tmp_path / "notes.txt"
    notes.write_text("original\n")
    path = "../escaped.txt" if target == "parent" else str(notes)
    r = _attack(f"    open({path!r}, 'w').write('escaped')\n    return 0\n", guard)
    assert r.status == "failed" and "PermissionError" in r.stderr
    assert notes.read_text() == "original\n"


@pytest.mark.parametrize("guard", GUARD)
def test_no_network_not_even_the_harness_on_localhost(guard):
    _needs(guard, True, NAMESPACES, "a network namespace")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        r = _attack(
            "    import socket\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'hello')\n    return 0\n",
            guard,
        )
        assert r.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()


@pytest.mark.parametrize("guard", GUARD)
def test_secrets_in_the_harness_environment_stay_hidden(guard, monkeypatch):
    monkeypatch.setenv("MINILLM_SECRET", "hunter2")
    r = _attack(
        "    import os\n    print(os.environ.get('MINILLM_SECRET'))\n"
        "    return os.environ['MINILLM_SECRET']\n",
        guard,
    )
    assert "KeyError" in r.stderr and "hunter2" not in r.stdout + r.stderr
    _needs(
        guard,
        False,
        OTHER_USER or NAMESPACES,
        "a separate user or namespaces (/proc/<pid>/environ is readable)",
    )
    r = _attack(f"    print(open('/proc/{os.getpid()}/environ').read())\n", guard)
    assert "hunter2" not in r.stdout + r.stderr


@pytest.mark.parametrize("guard", GUARD)
def test_killing_the_harness_fails(guard):
    _needs(
        guard,
        True,
        OTHER_USER or NAMESPACES,
        "a separate user or namespaces (the child could signal us)",
    )
    r = _attack(f"    import os, signal\n    os.kill({os.getpid()}, signal.SIGKILL)\n", guard)
    assert r.status == "failed" and (
        "ProcessLookupError" in r.stderr or "PermissionError" in r.stderr
    )
    os.kill(os.getpid(), 0)  # still here


def test_guard_is_on_by_default_and_only_a_guard():
    r = run_code(
        "import os, posix\ntry:\n    os.fork()\nexcept PermissionError as e:\n    print(e)\n"
        "print(callable(posix.fork))\n",
        timeout=30,
    )
    assert r.stdout == "os.fork() is disabled in the sandbox\nTrue\n"
    assert run_code("import shutil; shutil.rmtree('.')", timeout=30).status == "failed"
    assert run_code("import os; os.fork", guard=False, timeout=30).passed


# --- pass@k
# ------------------------------------------------------------------------------------------------


def _brute(n, c, k):
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_matches_counting_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert abs(pass_at_k(n, c, k) - float(_brute(n, c, k))) < 1e-12, (n, c, k)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every 5-subset holds a passing sample
    assert abs(pass_at_k(10, 3, 1) - 0.3) < 1e-12  # pass@1 is c / n
    assert abs(pass_at_k(200, 7, 100) - (1 - math.comb(193, 100) / math.comb(200, 100))) < 1e-12
    for bad in [(10, 11, 1), (10, -1, 1), (10, 3, 0), (10, 3, 11)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_evaluate_pass_at_k_counts_each_problem():
    problems = PROBLEMS[:3]
    good = {p["prompt"]: p["canonical_solution"] for p in problems}
    # problem i gets i correct samples out of 4
    wanted = {p["prompt"]: i for i, p in enumerate(problems)}
    generate = lambda prompt, n: (
        [good[prompt]] * wanted[prompt] + ["    return None\n"] * (n - wanted[prompt])
    )
    s = evaluate_pass_at_k(problems, generate, n=4, ks=(1, 2, 4), timeout=30)
    assert s["correct"] == {p["task_id"]: i for i, p in enumerate(problems)}
    for k in (1, 2, 4):
        assert abs(s[f"pass@{k}"] - sum(pass_at_k(4, c, k) for c in range(3)) / 3) < 1e-12
    with pytest.raises(ValueError, match="k <= n"):
        evaluate_pass_at_k(problems, generate, n=4, ks=(5,))
    with pytest.raises(ValueError, match="returned 1 completions"):
        evaluate_pass_at_k(problems, lambda prompt, n: ["    return None\n"], n=4, ks=(1,))


def test_truncate_completion():
    body = "    return sorted(set(numbers))[-2]\n"
    assert truncate_completion(body + "\n\ndef test():\n    pass\n") == body + "\n"
    assert truncate_completion(body + "if __name__ == '__main__':\n    main()\n") == body[:-1]
    assert truncate_completion(body + "# trailing comment\n") == body[:-1]
    assert (
        truncate_completion("    x = 1\n    # an indented comment\n    return x\n")
        == "    x = 1\n    # an indented comment\n    return x\n"
    )
