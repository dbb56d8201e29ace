"""Fuzzes ops with random bad arguments: `python tests/op_fuzz.py [CASE ...]` (default: every case of
op_cases.py) runs, for each case, hypothesis examples that change one to three arguments of its valid call
(another dtype, shape, device or layout, non-finite or out-of-range values, extreme numbers, another type)
and checks that the op either raises a clear error (ValueError, TypeError, RuntimeError or
NotImplementedError naming one of its arguments) or returns what the reference returns on the same
arguments. Arguments that are results of others (the forward's out and lse given to the backward) are
recomputed from the changed ones and never given other values.

Each case runs in its own process, forked from this one after the imports (so a case costs no import):
a crash, a hang (LLADA_FUZZ_TIMEOUT seconds, default 120) or an AddressSanitizer report ends that process
and is reported with its output. A process may use LLADA_FUZZ_MEMORY_MB of memory (default 4096; under
AddressSanitizer, the largest single allocation instead): a valid call that asks for more (num_experts =
2^31 - 1 allocates 8 GiB) ends in an allocation error, which counts as a clear error. The last line of
stdout is JSON: {case: status} with status "ok", "failed", "crashed (signal N)" or "hung".

LLADA_FUZZ_EXAMPLES sets the examples per case (default 40); LLADA_FUZZ_SEED, when set, explores other
examples than the default, deterministic ones.
"""
import copy
import faulthandler
import json
import math
import os
import re
import resource
import signal
import sys
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, Verbosity, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from op_cases import CASES, assert_same_result, make_case  # noqa: E402

INTS = [-2**63, -2**31 - 1, -2**31, -1, 0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 1e-30, 0.5, 1.0, 1.5, 1e39]
STRINGS = ["", "auto", "flash2", "hopper", "block_causal", "bd3", "causal", "CPU"]
DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.bool,
          torch.uint8]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 1e30, -1e30]
ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError)


def _out_of_memory(error: BaseException) -> bool:
    """An allocation that the process's memory limit refused (a valid request too large for it)."""
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error)


def _random_like(t: torch.Tensor, shape, g: torch.Generator) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(t.dtype)
    if t.dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    high = min(max(int(t.max()) + 2, 2), 2**31) if t.numel() else 4  # (seeds: any int64, beyond randint's range)
    return torch.randint(-1, high, shape, generator=g).to(t.dtype)


@st.composite
def tensor_change(draw, t: torch.Tensor, values: bool = True):
    """A changed version of tensor t (or something that is not a tensor); with values False, never other
    values of the same shape (for arguments that are results of others)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["dtype", "shape", "view", "meta"] + ["values"] * values + ["not a tensor"]))
    if kind == "dtype":
        return t.to(draw(st.sampled_from(DTYPES)))
    if kind == "shape":
        shape = list(t.shape)
        how = draw(st.sampled_from(["drop a dim", "add a dim", "resize", "empty"] if shape else ["add a dim"]))
        if how == "drop a dim":
            return t.reshape(-1)[: math.prod(shape[1:])].reshape(shape[1:]) if len(shape) > 1 else t.reshape(-1)[0]
        if how == "add a dim":
            return t.unsqueeze(draw(st.integers(0, len(shape))))
        dim = draw(st.integers(0, len(shape) - 1))
        shape[dim] = 0 if how == "empty" else max(0, shape[dim] + draw(st.sampled_from([-1, 1, 2])))
        return _random_like(t, shape, g)
    if kind == "view":
        how = draw(st.sampled_from(["stepped", "transposed"] + ["expanded"] * values))
        if how == "stepped" and t.dim() >= 1:  # the same values, every other row of a wider tensor
            return torch.stack([t, _random_like(t, t.shape, g)], 1).select(1, 0)
        if how == "transposed" and t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if t.numel():
            return t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape)
        return t
    if kind == "meta":
        return t.to("meta")
    if kind == "values":
        out = t.clone()
        if out.numel() == 0:
            return out
        flat = out.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, flat.numel() - 1))
            if out.dtype.is_floating_point:
                flat[i] = draw(st.sampled_from(SPECIAL_FLOATS))
            elif out.dtype == torch.bool:
                flat[i] = not bool(flat[i])
            else:
                info = torch.iinfo(out.dtype)
                value = draw(st.sampled_from(INTS + [int(flat[i]) + 1, int(flat[i]) - 1, t.numel(), t.shape[-1]]))
                flat[i] = min(max(value, info.min), info.max)
        return out
    return draw(st.sampled_from([None, 3, 1.5, [1, 2]]))


@st.composite
def value_change(draw, value, derived: bool = False):
    if isinstance(value, torch.Tensor):
        return draw(tensor_change(value, values=not derived))
    if isinstance(value, bool):
        return draw(st.sampled_from([not value, 1, None]))
    if isinstance(value, int):
        return draw(st.sampled_from(INTS + [value - 1, value + 1, 2 * value, 1.5, None]))
    if isinstance(value, float):
        return draw(st.sampled_from(FLOATS + [value * 2, 3, None]))
    if isinstance(value, str):
        return draw(st.sampled_from(STRINGS + [3]))
    return draw(st.sampled_from([None, 0]))


@st.composite
def changes(draw, case_name: str):
    case = make_case(case_name)
    names = list({**case.args, **case.kwargs})
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    derived = set(case.derive({**case.args, **case.kwargs})) if case.derive else set()
    if derived & set(chosen):  # another layout of out or lse must stay the forward of the other arguments
        chosen = [name for name in chosen if name in derived]
    return {name: draw(value_change({**case.args, **case.kwargs}[name], name in derived)) for name in chosen}


def _describe(change: dict) -> str:
    """The changed arguments in one line: tensors by dtype, device, shape, strides and extreme values."""
    def one(v):
        if not isinstance(v, torch.Tensor):
            return repr(v)
        text = f"tensor({v.dtype}, {v.device.type}, shape {list(v.shape)}, strides {list(v.stride())}"
        if not v.is_meta and v.numel() and v.dtype != torch.bool:
            w = v.double()
            text += f", min {w.min().item():g}, max {w.max().item():g}, NaN {int(w.isnan().sum())}"
        return text + ")"
    return "{" + ", ".join(f"{k}={one(v)}" for k, v in change.items()) + "}"


def _is_meta(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    return isinstance(value, (tuple, list)) and any(_is_meta(v) for v in value)


def _names_an_argument(message: str, names) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def _with_derived(case, change: dict) -> dict:
    """change plus the derived arguments it leaves alone, recomputed from the changed ones (kept as they are
    where the reference cannot compute them: the op must then refuse the other arguments)."""
    if case.derive is None:
        return change
    try:
        derived = case.derive({**case.args, **case.kwargs, **change})
    except Exception:  # noqa: BLE001 - arguments that the reference refuses
        return change
    return {**{n: v for n, v in derived.items() if n not in change}, **change}


def check(case_name: str, change: dict) -> None:
    case = make_case(case_name)
    names = list({**case.args, **case.kwargs})
    change = _with_derived(case, change)
    print(f"calling with {_describe(change)}", flush=True)  # the last line of a crashed process's log
    try:
        result = case.call(**copy.deepcopy(change))
    except MemoryError:
        return
    except ERRORS as error:
        if _out_of_memory(error):
            return
        message = str(error)
        assert "INTERNAL ASSERT" not in message, f"{case_name} {_describe(change)}: internal error {message}"
        assert _names_an_argument(message, names), \
            f"{case_name} with {_describe(change)}: the error names no argument: {type(error).__name__}: {message}"
        return
    if _is_meta(result):
        return  # every tensor argument on meta: shapes only, checked by test_op_devices
    try:
        expected = make_case(case_name).call(case.ref, **copy.deepcopy(change))
    except Exception as error:  # noqa: BLE001 - any failure of the reference
        if _out_of_memory(error):
            return
        raise AssertionError(f"{case_name} with {_describe(change)}: the op returns a result, the reference raises "
                             f"{type(error).__name__}: {error}") from error
    assert_same_result(result, expected, name=f"{case_name} with {_describe(change)}",
                       nan_within_reference=bool(case.nan_within_reference & set(change)), atol_of_largest=True)


def fuzz(case_name: str, examples: int, explore_seed) -> None:
    config = settings(max_examples=examples, deadline=None, database=None, derandomize=explore_seed is None,
                      suppress_health_check=list(HealthCheck), print_blob=False,
                      verbosity=Verbosity.quiet)

    @config
    @given(change=changes(case_name))
    def run(change):
        check(case_name, change)

    if explore_seed is not None:
        run = seed(int(explore_seed))(run)
    run()


def _under_asan() -> bool:
    return "asan" in os.environ.get("LD_PRELOAD", "")


def _limit_memory() -> None:
    megabytes = int(os.environ.get("LLADA_FUZZ_MEMORY_MB", "4096"))
    if not _under_asan():  # AddressSanitizer maps terabytes of shadow memory: it caps allocations instead
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))


def _run_case(case_name: str, examples: int, log_path: str) -> None:
    """The forked process of one case: never returns."""
    code = 1
    try:
        with open(log_path, "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        faulthandler.enable()
        _limit_memory()
        signal.alarm(int(os.environ.get("LLADA_FUZZ_TIMEOUT", "120")))
        fuzz(case_name, examples, os.environ.get("LLADA_FUZZ_SEED"))
        print(f"{case_name}: {examples} examples, every one a clear error or the reference's result", flush=True)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the exit status and the log
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return "hung" if sig == signal.SIGALRM else f"crashed (signal {sig})"
    return "ok" if os.WEXITSTATUS(wait_status) == 0 else "failed"


def main(argv) -> int:
    torch.set_num_threads(1)  # before the forks, which OpenMP teams would not survive
    examples = int(os.environ.get("LLADA_FUZZ_EXAMPLES", "40"))
    unknown = [c for c in argv if c not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; cases: {sorted(CASES)}", file=sys.stderr)
        return 2
    for case_name in argv or list(CASES):  # torch warms up here (one thread, no OpenMP team), not in each fork;
        case = make_case(case_name)         # the ops run in the forks only, where a crash ends one case
        case.call(case.ref)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for case_name in argv or list(CASES):
            log_path = os.path.join(folder, "log")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_case(case_name, examples, log_path)
            results[case_name] = _status(os.waitpid(pid, 0)[1])
            with open(log_path) as log:
                output = log.read()
            print(f"---- {case_name}: {results[case_name]}")
            lines = [line for line in output.splitlines() if not line.startswith("calling with")]
            if results[case_name].startswith(("crashed", "hung")):
                calls = [line for line in output.splitlines() if line.startswith("calling with")]
                lines = calls[-1:] + output.splitlines()[-30:]
            print("\n".join(lines[-200:]), flush=True)
    print(json.dumps(results))
    return 0 if all(s == "ok" for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
