"""The grouped LoRA kernels (``kernels/lora.py``) against their plain-torch references on fresh
random inputs, the references against a per-token float64 loop, the grouping against a plain
stable sort, and the wrappers' argument checks.

Cases cover one token, token counts that fill no tile, one adapter, more adapters than tokens,
every token without an adapter, unsorted mixes with -1, and a group spanning several row
blocks. On CPU the kernels run under the Triton interpreter in a subprocess
(``TRITON_INTERPRET=1`` must be set before triton is imported): ``python
tests/test_lora_kernels.py`` runs the small cases that way, in fp32 and fp16 (the interpreter's
``tl.dot`` reads bf16 operands as raw bits; bf16 runs on the GPU). On a CUDA GPU every case runs
natively in fp16/bf16/fp32, at Llama-3-8B's q/k/v shapes too, and inside a captured CUDA graph.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest
import torch

import kernel_cases
from kernel_cases import hopper_ptx, interpreted_checks_passed, run_cases
from test_kernels import _assert_close, _poison_allocator, needs_cuda

from baton.kernels import lora, ops
from baton.kernels.lora import LoRAConfig, launch_lora_expand_add, launch_lora_shrink

fresh_seed = kernel_cases.fresh_seed   # autouse: new random inputs on every run, the seed printed

# (tokens, adapters, rank width, in, out, how tokens pick adapters)
CASES = [
    (1, 1, 16, 64, 48, "mixed"),
    (1, 3, 24, 100, 70, "none"),
    (37, 3, 24, 100, 70, "mixed"),
    (16, 1, 8, 32, 40, "all"),
    (5, 8, 16, 64, 33, "mixed"),
    (70, 4, 48, 256, 300, "skewed"),
    (40, 2, 8, 48, 20, "none"),
]
SMALL_TILES = LoRAConfig(block_m=16, block_n=16, block_k=16, num_stages=1)   # every case spans several tiles
SPLIT_TILES = LoRAConfig(block_m=16, block_n=16, block_k=16, num_stages=1, splits=3)   # shrink adds three parts a tile


def case_id(case: tuple) -> str:
    return "T{}-n{}-w{}-in{}-out{}-{}".format(*case)


def assign(tokens: int, n: int, how: str, device: str) -> torch.Tensor:
    """Each token's adapter, in token order (unsorted): ``mixed`` any of them or -1, ``all`` any of
    them, ``none`` all -1, ``skewed`` three quarters on one adapter, the rest mixed."""
    adapters = torch.randint(-1 if how != "all" else 0, n, (tokens,))
    if how == "none":
        adapters.fill_(-1)
    elif how == "skewed":
        adapters[torch.randperm(tokens)[: 3 * tokens // 4]] = int(torch.randint(0, n, ()))
    return adapters.to(device)


def lora_case(tokens: int, n: int, w: int, k: int, out_width: int, how: str, dtype: torch.dtype, device: str):
    """``x`` (a view whose row stride passes its width, as a slice of a wider activation), ``a``,
    ``b``, the adapters and a random ``out``."""
    x = torch.randn(tokens, k + 3, dtype=dtype, device=device)[:, :k]
    a = torch.randn(n, w, k, dtype=dtype, device=device)
    b = torch.randn(n, out_width, w, dtype=dtype, device=device)
    out = torch.randn(tokens, out_width, dtype=dtype, device=device)
    return x, a, b, assign(tokens, n, how, device), out


def check_lora(device: str, dtype: torch.dtype, case: tuple, config: LoRAConfig | None = None) -> None:
    """Shrink then expand-add against the references, on the kernels' shared grouping: rows
    without an adapter give zeros and leave ``out`` as it was, to the bit."""
    x, a, b, adapters, out = lora_case(*case, dtype, device)
    groups = lora.group_by_adapter(adapters, a.shape[0])
    none = adapters < 0
    _poison_allocator(device, 4 * x.shape[0] * a.shape[1])
    y = launch_lora_shrink(x, a, adapters, groups, config)
    want_y = lora.ref_lora_shrink(x, a, adapters)
    assert y.dtype == torch.float32
    _assert_close(y, want_y, dtype)
    assert torch.equal(y[none], torch.zeros_like(y[none]))
    before = out.clone()
    want = lora.ref_lora_expand_add(want_y, b, adapters, out.clone())
    assert launch_lora_expand_add(y, b, adapters, out, groups, config) is out
    _assert_close(out, want, dtype)
    assert torch.equal(out[none], before[none])


def small_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """The cases the interpreter can afford (default tiles, then small ones); also the first pass on GPU."""
    for case in CASES:
        yield f"lora {case_id(case)}", lambda c=case: check_lora(device, dtype, c)
        yield f"lora {case_id(case)} small tiles", lambda c=case: check_lora(device, dtype, c, SMALL_TILES)
        yield f"lora {case_id(case)} split reduction", lambda c=case: check_lora(device, dtype, c, SPLIT_TILES)
    for tokens, n in ((1, 1), (37, 3), (1500, 5)):   # the last spans two of the kernel's blocks
        yield f"grouping T{tokens} n{n}", lambda t=tokens, n=n: check_grouping(device, t, n)


def check_grouping(device: str, tokens: int, n: int) -> None:
    """The grouping kernel gives the reference's order and starts (out-of-range adapters: none)."""
    adapters = torch.randint(-2, n + 2, (tokens,), device=device)
    got, want = lora.launch_group_by_adapter(adapters, n), lora.ref_group_by_adapter(adapters, n)
    assert torch.equal(got.order, want.order) and torch.equal(got.starts, want.starts)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_refs_match_a_per_token_loop(dtype: torch.dtype, case: tuple) -> None:
    x, a, b, adapters, out = lora_case(*case, dtype, "cpu")
    want_y = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    want = out.double()
    for t, i in enumerate(adapters.tolist()):
        if i >= 0:
            want_y[t] = a[i].double() @ x[t].double()
            want[t] += b[i].double() @ want_y[t]
    y = lora.ref_lora_shrink(x, a, adapters)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-4)
    assert lora.ref_lora_expand_add(y, b, adapters, out) is out
    tol = 1e-5 if dtype == torch.float32 else 8e-3   # fp32 sums in another order; bf16 rounds once more
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 3, 8])
def test_grouping_is_a_stable_sort_by_adapter(n: int) -> None:
    """Tokens without an adapter (-1, or any value outside [0, n)) form group 0, first."""
    adapters = torch.randint(-2, n + 2, (int(torch.randint(1, 60, ())),))
    groups = lora.ref_group_by_adapter(adapters, n)
    key = torch.where((adapters >= 0) & (adapters < n), adapters + 1, 0)
    assert torch.equal(groups.order, torch.sort(key, stable=True).indices)
    assert groups.starts.tolist() == [0, *torch.tensor([int((key <= g).sum()) for g in range(n + 1)]).tolist()]
    assert groups.order.dtype == groups.starts.dtype == torch.int64


@pytest.mark.unit
def test_kernels_ignore_adapters_outside_the_stack_as_the_refs_do() -> None:
    x, a, b, _, out = lora_case(9, 2, 16, 32, 24, "all", torch.float32, "cpu")
    adapters = torch.tensor([0, 5, -3, 1, 2, -1, 1, 0, 7])
    assert torch.equal(ops.lora_shrink(x, a, adapters), lora.ref_lora_shrink(x, a, adapters))
    y = lora.ref_lora_shrink(x, a, adapters)
    assert torch.equal(y[[1, 2, 4, 5, 8]], torch.zeros(5, 16))
    before = out.clone()
    assert torch.equal(ops.lora_expand_add(y, b, adapters, out)[[1, 2, 4, 5, 8]], before[[1, 2, 4, 5, 8]])


def _bad_calls():
    x, a, b, adapters, out = lora_case(4, 2, 16, 32, 24, "mixed", torch.float32, "cpu")
    y = torch.randn(4, 16)
    yield "x must have shape", lambda: lora.lora_shrink(x[0], a, adapters)
    yield "a must have shape", lambda: lora.lora_shrink(x, a[..., :31], adapters)
    yield "a dtype torch.float16 must match x dtype", lambda: lora.lora_shrink(x, a.half(), adapters)
    yield "x must be contiguous in its last dim", lambda: lora.lora_shrink(torch.randn(4, 64)[:, ::2], a, adapters)
    yield "adapters must have dtype", lambda: lora.lora_shrink(x, a, adapters.float())
    yield "adapters must have shape", lambda: lora.lora_shrink(x, a, adapters[:3])
    yield "groups.starts must have shape", lambda: lora.lora_shrink(x, a, adapters, lora.group_by_adapter(adapters, 3))
    yield "b must have shape", lambda: lora.lora_expand_add(y, b[..., :8], adapters, out)
    yield "out must have shape", lambda: lora.lora_expand_add(y, b, adapters, out[:, :20])
    yield "out dtype torch.float16 must match b dtype", lambda: lora.lora_expand_add(y, b, adapters, out.half())
    yield "out must be contiguous in its last dim", lambda: lora.lora_expand_add(y, b, adapters, torch.randn(24, 4).t())


@pytest.mark.unit
@pytest.mark.parametrize("message,call", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_wrappers_reject_bad_input_with_clear_errors(message: str, call) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.unit
def test_ops_use_the_references_for_cpu_tensors() -> None:
    x, a, b, adapters, out = lora_case(37, 3, 24, 100, 70, "mixed", torch.float32, "cpu")
    y = ops.lora_shrink(x, a, adapters)
    assert torch.equal(y, lora.ref_lora_shrink(x, a, adapters))
    want = lora.ref_lora_expand_add(y, b, adapters, out.clone())
    assert torch.equal(ops.lora_expand_add(y, b, adapters, out), want)


@pytest.mark.unit
def test_lora_kernels_under_triton_interpreter() -> None:
    stdout = interpreted_checks_passed(__file__)
    expected = 2 * sum(1 for _ in small_cases("cpu", torch.float32))
    assert f"{expected} interpreted checks passed" in stdout, stdout


LORA_POINTERS = {"order_ptr": "*i64", "starts_ptr": "*i64"}


@pytest.mark.unit
@pytest.mark.parametrize("kernel,pointers", [
    ("_lora_shrink_kernel", {"x_ptr": "*bf16", "a_ptr": "*bf16", "y_ptr": "*fp32", **LORA_POINTERS}),
    ("_lora_expand_kernel", {"y_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16", **LORA_POINTERS}),
], ids=["shrink", "expand"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_lora_kernels_compile_for_hopper_with_tensor_cores(kernel: str, pointers: dict[str, str], block_m: int) -> None:
    """The bf16 tiles the default configs pick compile for an H100 and multiply on tensor cores."""
    constants = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, DOT_PRECISION="tf32")
    if kernel == "_lora_shrink_kernel":
        constants.update(EVEN_K=True, ATOMIC=True)   # a decode step's split reduction
    ptx = hopper_ptx(f"baton.kernels.lora:{kernel}", pointers, constants)
    assert "mma" in ptx


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_lora_kernels_on_gpu(dtype: torch.dtype) -> None:
    """The small cases, then Llama-3-8B's fused q/k/v (4096 in, 6144 out, three slices) at 1 to
    2,048 tokens, 4 adapters of rank 16 and 32 of rank 64."""
    assert run_cases(small_cases("cuda", dtype)) > 0
    for tokens, (n, rank) in itertools.product((1, 16, 300, 2048), ((4, 16), (32, 64))):
        check_lora("cuda", dtype, (tokens, n, 3 * rank, 4096, 6144, "mixed"))


@pytest.mark.gpu
@needs_cuda
def test_lora_in_cuda_graph_regroups_on_replay() -> None:
    """The grouping, shrink and expand captured in one graph compute on the adapters present at
    replay: another mix, every token on one adapter, none on any."""
    x, a, b, adapters, out = lora_case(24, 4, 32, 256, 96, "mixed", torch.bfloat16, "cuda")
    base = out.clone()

    def step() -> None:
        out.copy_(base)
        groups = lora.group_by_adapter(adapters, a.shape[0])
        ops.lora_expand_add(ops.lora_shrink(x, a, adapters, groups), b, adapters, out, groups)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for how in ("mixed", "all", "none", "skewed"):
        adapters.copy_(assign(24, 4, how, "cuda"))
        x.copy_(torch.randn_like(x))
        graph.replay()
        want = lora.ref_lora_expand_add(lora.ref_lora_shrink(x, a, adapters), b, adapters, base.clone())
        _assert_close(out, want, torch.bfloat16)


if __name__ == "__main__":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    passed = run_cases(small_cases("cpu", torch.float32)) + run_cases(small_cases("cpu", torch.float16))
    print(f"{passed} interpreted checks passed")
