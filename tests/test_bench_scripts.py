"""The GPU benchmark scripts (``bench/``) run only on a GPU machine, so CI checks what it can
without one: each imports, and each call one script makes of a function another defines binds
to that function's signature (``profile_step.py`` and ``step_times.py`` once called
``bench_model.bench_llm`` with arguments it had made required)."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


@pytest.fixture(scope="module", autouse=True)
def bench_on_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def cross_script_calls(script: str) -> list[tuple[str, str, ast.Call]]:
    """``(module, function, call)`` for each call in ``script`` of a function it imports from
    another benchmark script."""
    tree = ast.parse((BENCH / f"{script}.py").read_text())
    imported = {alias.asname or alias.name: (node.module, alias.name)
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS
                for alias in node.names}
    return [(*imported[node.func.id], node) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_and_its_calls_bind(script: str) -> None:
    importlib.import_module(script)
    for module, name, call in cross_script_calls(script):
        fn = getattr(importlib.import_module(module), name)
        if not callable(fn) or inspect.isclass(fn):
            continue
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            continue   # *args or **kwargs: nothing to bind statically
        try:
            inspect.signature(fn).bind(*call.args, **{k.arg: k.value for k in call.keywords})
        except TypeError as exc:
            pytest.fail(f"bench/{script}.py line {call.lineno}: {module}.{name}(...) does not bind: {exc}")


def test_the_calls_between_scripts_are_found() -> None:
    found = {(script, module, name) for script in SCRIPTS for module, name, _ in cross_script_calls(script)}
    assert {("profile_step", "bench_model", "bench_llm"), ("step_times", "bench_model", "bench_llm"),
            ("bench_model", "bench_offline", "make_prompts")} <= found
