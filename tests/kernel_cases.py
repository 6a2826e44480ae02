"""What the kernel test modules share: the GQA shapes they sweep, a fresh,
printed seed per test (import ``fresh_seed`` to use it: it is autouse),
running named check cases, natively or in a Triton-interpreter subprocess, and
compiling a kernel for a Hopper GPU without one (its PTX, or the registers and shared memory
a program of it takes)."""

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch

GQA = [(2, 2), (4, 2), (8, 2), (16, 2), (4, 1)]  # (heads, kv_heads): ratios 1, 2, 4, 8 and MQA


@pytest.fixture(autouse=True)
def fresh_seed() -> None:
    """New random inputs on every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")
    torch.manual_seed(seed)


def run_cases(cases: Iterator[tuple[str, Callable[[], None]]]) -> int:
    """Run every ``(name, check)``; returns how many ran. A failure names its case."""
    count = 0
    for name, case in cases:
        try:
            case()
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        count += 1
    return count


def interpreted_checks_passed(script: str) -> str:
    """Run a test module as a script with ``TRITON_INTERPRET=1`` (which must be set
    before triton is imported) and return its stdout; the script's ``__main__``
    prints ``"<n> interpreted checks passed"``."""
    # The script imports its neighbours (this module) from its folder, which PYTHONSAFEPATH
    # (set by scripts/test.sh) keeps off sys.path.
    path = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(script)), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


_HOPPER_COMPILE = """
import importlib, inspect, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, name = sys.argv[1].split(":")
kernel = getattr(importlib.import_module(module), name)
names = list(inspect.signature(kernel.fn).parameters)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
found = []
for job in json.loads(sys.argv[2]):
    constants = job["constants"]
    signature = {n: "constexpr" if n in constants else job["pointers"].get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=job["options"])
    if job["ptx"]:
        found.append({"ptx": compiled.asm["ptx"]})
        continue
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found.append({"registers": int(usage.split("REG:")[1].split()[0]), "shared": compiled.metadata.shared})
sys.stdout.write(json.dumps(found))
"""


def _hopper_compile(kernel: str, jobs: list[dict], timeout: int) -> list[dict]:
    """Compile ``kernel`` (``"module:name"``) for an sm_90 target without a GPU, once a job, in one
    child process (libtriton's objects outlive a compile, and nanobind lists them at exit)."""
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE, kernel, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def hopper_ptx(kernel: str, pointers: dict[str, str], constants: dict[str, object], divisible: tuple[str, ...] = ()) -> str:
    """The PTX of ``kernel``'s sm_90 compile: parameters in neither dict are i32, those ``divisible``
    by 16 specialized so, as a launch does."""
    job = {"pointers": pointers, "constants": constants, "divisible": list(divisible), "options": {}, "ptx": True}
    return _hopper_compile(kernel, [job], timeout=240)[0]["ptx"]


def hopper_resources(kernel: str, jobs: list[dict]) -> list[dict[str, int]]:
    """For each job (``pointers`` and ``constants`` as ``hopper_ptx`` takes them, the parameters
    ``divisible`` by 16 as a launch specializes them, and the compile ``options``: warps, stages),
    the registers a thread of ``kernel``'s sm_90 compile takes and the shared memory (bytes) a
    program does, all in one child process."""
    return _hopper_compile(kernel, [{**job, "ptx": False} for job in jobs], timeout=600)
