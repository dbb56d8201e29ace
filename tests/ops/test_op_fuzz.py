"""The fuzz test: every op of op_cases.py fed random bad arguments by tests/op_fuzz.py (hypothesis), each op
in a process of its own, so that a crash or a hang fails its op's test with the example that caused it.
Every example must give a clear error naming an argument or the reference's result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from op_cases import CASES

pytestmark = pytest.mark.kernels

FUZZ = Path(__file__).parents[1] / "op_fuzz.py"
EXAMPLES = 25  # per op: about 0.1 s each on the CPU; LLADA_FUZZ_EXAMPLES overrides


@pytest.fixture(scope="module")
def fuzz_run():
    env = dict(os.environ)
    env.setdefault("LLADA_FUZZ_EXAMPLES", str(EXAMPLES))
    run = subprocess.run([sys.executable, str(FUZZ)], capture_output=True, text=True, env=env, timeout=600)
    lines = run.stdout.strip().splitlines()
    try:
        statuses = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"op_fuzz.py ended without its summary (exit {run.returncode}):\n{run.stdout[-4000:]}"
                    f"\n{run.stderr[-4000:]}")
    logs, current = {}, None
    for line in lines[:-1]:
        if line.startswith("---- "):
            current = line[5:].rsplit(": ", 1)[0]
            logs[current] = []
        elif current is not None:
            logs[current].append(line)
    return statuses, {name: "\n".join(text) for name, text in logs.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_gives_a_clear_error_or_the_reference_result(fuzz_run, name):
    statuses, logs = fuzz_run
    assert statuses.get(name) == "ok", f"{name}: {statuses.get(name, 'not run')}\n{logs.get(name, '')[-6000:]}"


def test_a_failing_example_fails_its_op(tmp_path):
    """The harness itself: an op that returns a wrong result, or crashes, is reported so."""
    script = tmp_path / "broken_fuzz.py"
    script.write_text(f"""
import sys, os
sys.argv = [sys.argv[0], "moe_route", "llada.moe_route"]
sys.path.insert(0, {str(FUZZ.parent)!r})
import op_cases, torch
wrong = op_cases.CASES["moe_route"]
def broken(g):
    case = wrong(g)
    case.op = lambda *a, **kw: tuple(t + 1 for t in case.ref(*a, **kw))
    return case
op_cases.CASES["moe_route"] = broken
def crashing(g):
    case = wrong(g)
    case.op = lambda *a, **kw: os.kill(os.getpid(), 11)
    return case
op_cases.CASES["llada.moe_route"] = crashing
import runpy
runpy.run_path({str(FUZZ)!r}, run_name="__main__")
""")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=dict(os.environ, LLADA_FUZZ_EXAMPLES="5"), timeout=300)
    assert run.returncode == 1
    statuses = json.loads(run.stdout.strip().splitlines()[-1])
    assert statuses["moe_route"] == "failed"
    assert statuses["llada.moe_route"].startswith("crashed (signal")  # SIGABRT under AddressSanitizer
