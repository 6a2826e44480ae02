"""The fused mixture-of-experts kernels (``kernels/moe.py``) against their plain-torch reference on
fresh random inputs, the reference against a per-token, per-expert loop, the alignment against
its torch reference, and the wrapper's argument checks.

Cases cover no tokens, one token, token counts that fill no tile, an expert no token picks, every
token on one expert (its pairs span several tiles), one expert a token, every expert a token, and
ids outside ``[0, E)`` (those pairs add nothing). On CPU the kernels run under the Triton
interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported):
``python tests/test_moe_kernels.py`` runs the small cases that way, in fp32 and fp16 (the
interpreter's ``tl.dot`` reads bf16 operands as raw bits; bf16 runs on the GPU), both activations,
default and small tiles. On a CUDA GPU the small cases run natively in fp16/bf16/fp32, then
Mixtral-8x7B's and Qwen3-30B-A3B's layer shapes at 1 to 2,048 tokens, and the kernels inside a
captured CUDA graph.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import kernel_cases
from kernel_cases import hopper_ptx, interpreted_checks_passed, run_cases
from test_kernels import _assert_close, _poison_allocator, needs_cuda

from baton.kernels import moe, ops
from baton.kernels.activation import ACTIVATIONS
from baton.kernels.moe import MoEConfig

fresh_seed = kernel_cases.fresh_seed   # autouse: new random inputs on every run, the seed printed

# (tokens, experts, k, hidden, inter, how the tokens route)
CASES = [
    (0, 4, 2, 32, 24, "random"),
    (1, 4, 2, 64, 32, "random"),
    (37, 8, 2, 96, 48, "unused"),
    (40, 4, 1, 32, 40, "one"),
    (19, 3, 3, 48, 24, "random"),
    (50, 16, 4, 64, 32, "one"),
    (30, 6, 2, 32, 24, "outside"),
]
SMALL_TILES = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)   # several tiles of rows and columns
MODEL_SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}   # hidden, inter, experts, k
TORCH_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


def case_id(case: tuple) -> str:
    return "T{}-E{}-k{}-H{}-I{}-{}".format(*case)


def route(tokens: int, experts: int, k: int, how: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights and ``k`` distinct experts a token, in no particular order (int32 ids for an odd
    token count, else int64): ``random``; ``unused``: never the last expert; ``one``: expert 0 among
    every token's; ``outside``: a fifth of the ids -1 or ``experts``."""
    scores = torch.rand(tokens, experts)
    if how == "unused":
        scores[:, -1] = -1.0
    elif how == "one":
        scores[:, 0] = 2.0
    ids = scores.topk(k, dim=-1).indices[:, torch.randperm(k)]
    if how == "outside":
        off = torch.rand(ids.shape) < 0.2
        ids[off] = torch.where(torch.rand(ids.shape) < 0.5, -1, experts)[off]
    return torch.rand(tokens, k).to(device), ids.to(device, torch.int32 if tokens % 2 else torch.int64)


def expert_weights(experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]``, scaled by their fan-in (16-bit sums stay finite)."""
    gate_up = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    return gate_up, down


def moe_case(tokens: int, experts: int, k: int, hidden: int, inter: int, how: str, dtype: torch.dtype, device: str):
    """``x`` (a view whose row stride passes its width), ``gate_up``, ``down``, the weights and ids."""
    x = torch.randn(tokens, hidden + 3, dtype=dtype, device=device)[:, :hidden]
    return x, *expert_weights(experts, hidden, inter, dtype, device), *route(tokens, experts, k, how, device)


def check_moe(device: str, dtype: torch.dtype, case: tuple, activation: str, config: MoEConfig | None = None) -> None:
    """``fused_moe`` against ``ref_fused_moe``; no tokens give an empty ``[0, H]``."""
    x, gate_up, down, weights, ids = moe_case(*case, dtype, device)
    _poison_allocator(device, 4 * ids.numel() * x.shape[1])
    got = moe.fused_moe(x, gate_up, down, weights, ids, activation, config)
    want = moe.ref_fused_moe(x, gate_up, down, weights, ids, activation)
    if x.shape[0] == 0:
        assert got.shape == want.shape == (0, x.shape[1])
        return
    _assert_close(got, want, dtype)


def check_alignment(device: str, tokens: int, experts: int, k: int, how: str, block_m: int) -> None:
    """The alignment kernel's tiles in use match the reference's, within ``max_tiles``."""
    _, ids = route(tokens, experts, k, how, device)
    got, want = moe.moe_align(ids, experts, block_m), moe.ref_moe_align(ids, experts, block_m)
    tiles = int(want.num_tiles)
    assert got.tile_expert.numel() == moe.max_tiles(ids.numel(), experts, block_m) >= tiles
    assert got.num_tiles.tolist() == [tiles]
    assert torch.equal(got.sorted_pairs[: tiles * block_m], want.sorted_pairs)
    assert torch.equal(got.tile_expert[:tiles], want.tile_expert)


def small_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """The cases the interpreter can afford (default tiles, then small ones); also the first pass on GPU."""
    for case, activation in itertools.product(CASES, ACTIVATIONS):
        yield f"moe {case_id(case)} {activation}", lambda c=case, a=activation: check_moe(device, dtype, c, a)
        yield f"moe {case_id(case)} {activation} small tiles", lambda c=case, a=activation: check_moe(device, dtype, c, a, SMALL_TILES)
    for tokens, experts, k, how, block_m in ((1, 1, 1, "random", 16), (37, 8, 2, "unused", 16), (40, 4, 1, "one", 32),
                                              (600, 16, 4, "one", 16), (30, 6, 2, "outside", 16)):   # 2,400 pairs: three blocks
        yield (f"alignment T{tokens} E{experts} k{k} {how} block_m {block_m}",
               lambda a=(tokens, experts, k, how, block_m): check_alignment(device, *a))


def naive_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              activation: str) -> torch.Tensor:
    """Token by token, expert by expert, in float64: the gate/up product and the activation rounded
    to x's dtype as the kernel rounds them, the sum not."""
    dtype, experts = x.dtype, gate_up.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, j in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        e = int(ids[t, j])
        if 0 <= e < experts:
            gate, up = (gate_up[e].double() @ x[t].double()).to(dtype).chunk(2)
            h = TORCH_ACTIVATIONS[activation](gate) * up
            out[t] += float(weights[t, j]) * (down[e].double() @ h.double())
    return out


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ref_matches_a_per_token_loop(dtype: torch.dtype, activation: str, case: tuple) -> None:
    x, gate_up, down, weights, ids = moe_case(*case, dtype, "cpu")
    got = moe.ref_fused_moe(x, gate_up, down, weights, ids, activation)
    want = naive_moe(x, gate_up, down, weights, ids, activation)
    assert got.shape == x.shape and got.dtype == dtype
    # fp32 sums in another order; a 16-bit gate/up product may round the other way, and the end once more
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.unit
def test_ref_takes_int32_and_int64_ids_alike() -> None:
    x, gate_up, down, weights, ids = moe_case(37, 8, 2, 64, 48, "random", torch.float32, "cpu")
    assert torch.equal(moe.ref_fused_moe(x, gate_up, down, weights, ids.int()),
                       moe.ref_fused_moe(x, gate_up, down, weights, ids.long()))


@pytest.mark.unit
@pytest.mark.parametrize("block_m", [2, 3, 4])
def test_max_tiles_covers_every_routing(block_m: int) -> None:
    """Over every split of up to 12 pairs among up to 4 experts, the most tiles is ``max_tiles``."""
    for pairs, experts in itertools.product(range(13), range(1, 5)):
        most = max((sum(-(-c // block_m) for c in counts) for counts in itertools.product(range(pairs + 1), repeat=experts)
                    if sum(counts) == pairs), default=0)
        assert moe.max_tiles(pairs, experts, block_m) == most, (pairs, experts)


@pytest.mark.unit
@pytest.mark.parametrize("tokens,per_expert_rows", [(1, 16), (256, 16), (1024, 32), (4096, 64)])
def test_default_tiles_grow_with_the_pairs_an_expert_gets(tokens: int, per_expert_rows: int) -> None:
    """Qwen3-30B-A3B's routing (8 of 128 experts): decode steps take 16-row tiles."""
    cfg = moe.default_config(tokens, 8, 128, torch.bfloat16)
    assert cfg.block_m == per_expert_rows
    assert moe.default_config(tokens, 8, 128, torch.float32).num_stages <= 2


def _bad_calls():
    x, gate_up, down, weights, ids = moe_case(4, 4, 2, 32, 24, "random", torch.float32, "cpu")
    call = functools.partial(moe.fused_moe, x, gate_up, down, weights, ids)
    yield "activation must be one of", lambda: call("relu")
    yield "x must have shape", lambda: moe.fused_moe(x[0], gate_up, down, weights, ids)
    yield "x must have dtype", lambda: moe.fused_moe(x.double(), gate_up.double(), down.double(), weights, ids)
    yield "x must be contiguous in its last dim", lambda: moe.fused_moe(torch.randn(4, 64)[:, ::2], gate_up, down, weights, ids)
    yield "gate_up dtype torch.float16 must match x dtype", lambda: moe.fused_moe(x, gate_up.half(), down, weights, ids)
    yield "gate_up is on meta", lambda: moe.fused_moe(x, gate_up.to("meta"), down, weights, ids)
    yield "gate_up must have shape", lambda: moe.fused_moe(x, gate_up[..., :31], down, weights, ids)
    yield r"gate_up must have 2 \* I > 0 rows", lambda: moe.fused_moe(x, gate_up[:, :-1].contiguous(), down, weights, ids)
    yield "gate_up must be contiguous", lambda: moe.fused_moe(x, torch.randn(4, 48, 64)[..., ::2], down, weights, ids)
    yield "down must have shape", lambda: moe.fused_moe(x, gate_up, down[..., :-1].contiguous(), weights, ids)
    yield "down must have shape", lambda: moe.fused_moe(x, gate_up, down[:3], weights, ids)
    yield "down must be contiguous", lambda: moe.fused_moe(x, gate_up, torch.randn(4, 32, 48)[..., ::2], weights, ids)
    yield "topk_ids must have dtype", lambda: moe.fused_moe(x, gate_up, down, weights, ids.float())
    yield "topk_ids must have shape", lambda: moe.fused_moe(x, gate_up, down, weights, ids[:3])
    yield "topk_ids must be contiguous", lambda: moe.fused_moe(x, gate_up, down, weights, ids.t().contiguous().t())
    yield "topk_ids must pick 1 to E=4 experts", lambda: moe.fused_moe(x, gate_up, down, weights, ids[:, :0])
    yield "topk_ids must pick 1 to E=4 experts", lambda: moe.fused_moe(x, gate_up, down, torch.rand(4, 5), torch.zeros(4, 5, dtype=torch.int64))
    yield "topk_weights must have shape", lambda: moe.fused_moe(x, gate_up, down, weights[:, :1], ids)
    yield "topk_weights must have dtype", lambda: moe.fused_moe(x, gate_up, down, weights.half(), ids)
    yield "topk_weights must be contiguous", lambda: moe.fused_moe(x, gate_up, down, weights.t().contiguous().t(), ids)
    yield "config.block_m must be a power of two >= 16", lambda: call(config=MoEConfig(block_m=24))
    yield "config.block_k must be a power of two >= 16", lambda: call(config=MoEConfig(block_k=8))
    yield "block_m must be a power of two >= 16", lambda: moe.moe_align(ids, 4, 8)


@pytest.mark.unit
@pytest.mark.parametrize("message,call", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_wrapper_rejects_bad_input_with_clear_errors(message: str, call) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.unit
def test_no_tokens_give_an_empty_output_without_a_launch() -> None:
    x, gate_up, down, weights, ids = moe_case(0, 4, 2, 32, 24, "random", torch.bfloat16, "cpu")
    got = moe.fused_moe(x, gate_up, down, weights, ids)
    assert got.shape == (0, 32) and got.dtype == torch.bfloat16


@pytest.mark.unit
def test_ops_use_the_reference_for_cpu_tensors() -> None:
    x, gate_up, down, weights, ids = moe_case(37, 8, 2, 96, 48, "unused", torch.float32, "cpu")
    assert torch.equal(ops.fused_moe(x, gate_up, down, weights, ids, "gelu_pytorch_tanh"),
                       moe.ref_fused_moe(x, gate_up, down, weights, ids, "gelu_pytorch_tanh"))


@pytest.mark.unit
def test_moe_kernels_under_triton_interpreter() -> None:
    stdout = interpreted_checks_passed(__file__)
    expected = 2 * sum(1 for _ in small_cases("cpu", torch.float32))
    assert f"{expected} interpreted checks passed" in stdout, stdout


TILE_POINTERS = {"sorted_ptr": "*i32", "tile_expert_ptr": "*i32", "num_tiles_ptr": "*i32"}


@pytest.mark.unit
@pytest.mark.parametrize("kernel,pointers,constants", [
    ("_moe_gate_up_kernel", {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", **TILE_POINTERS},
     dict(TOPK=8, ACTIVATION="silu", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, EVEN_K=True, DOT_PRECISION="tf32")),
    ("_moe_gate_up_kernel", {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", **TILE_POINTERS},
     dict(TOPK=2, ACTIVATION="gelu_pytorch_tanh", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, EVEN_K=True, DOT_PRECISION="tf32")),
    ("_moe_down_kernel", {"h_ptr": "*bf16", "w_ptr": "*bf16", "weights_ptr": "*fp32", "y_ptr": "*fp32", **TILE_POINTERS},
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, EVEN_K=True, DOT_PRECISION="tf32")),
    ("_moe_down_kernel", {"h_ptr": "*bf16", "w_ptr": "*bf16", "weights_ptr": "*fp32", "y_ptr": "*fp32", **TILE_POINTERS},
     dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, EVEN_K=True, DOT_PRECISION="tf32")),
], ids=["gate_up-decode", "gate_up-prefill", "down-decode", "down-prefill"])
def test_moe_gemms_compile_for_hopper_with_tensor_cores(kernel: str, pointers: dict[str, str], constants: dict) -> None:
    """The bf16 tiles the default configs pick compile for an H100 and multiply on tensor cores."""
    assert "mma" in hopper_ptx(f"baton.kernels.moe:{kernel}", pointers, constants)


@pytest.mark.unit
@pytest.mark.parametrize("experts", [8, 128])
def test_moe_alignment_and_sum_compile_for_hopper(experts: int) -> None:
    """The alignment's histogram over Mixtral's and Qwen3-MoE's experts, and the sum over k, lower for an H100."""
    align = {"ids_ptr": "*i64", "sorted_ptr": "*i32", "tile_expert_ptr": "*i32", "num_tiles_ptr": "*i32"}
    assert hopper_ptx("baton.kernels.moe:_moe_align_kernel", align, dict(BLOCK_M=16, E_PAD=experts, BLOCK=1024))
    sums = {"y_ptr": "*fp32", "ids_ptr": "*i32", "out_ptr": "*bf16"}
    assert hopper_ptx("baton.kernels.moe:_moe_sum_kernel", sums, dict(TOPK=2 if experts == 8 else 8, BLOCK=1024))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_moe_small_cases_on_gpu(dtype: torch.dtype) -> None:
    assert run_cases(small_cases("cuda", dtype)) > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_fused_moe_at_model_shapes_on_gpu(dtype: torch.dtype, model: str) -> None:
    """One layer's experts at 1 to 2,048 tokens routed at random, and 300 tokens that all pick expert 0."""
    hidden, inter, experts, k = MODEL_SHAPES[model]
    gate_up, down = expert_weights(experts, hidden, inter, dtype, "cuda")
    for tokens, how in ((1, "random"), (7, "random"), (64, "random"), (300, "random"), (300, "one"), (2048, "random")):
        x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
        weights, ids = route(tokens, experts, k, how, "cuda")
        _poison_allocator("cuda", 4 * tokens * k * max(hidden, inter))
        got = moe.fused_moe(x, gate_up, down, weights, ids)
        want = moe.ref_fused_moe(x, gate_up, down, weights, ids)
        try:
            _assert_close(got, want, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{model} T{tokens} {how}: {exc}") from exc


@pytest.mark.gpu
@needs_cuda
def test_fused_moe_reaches_experts_past_two_to_the_31_elements() -> None:
    """Three experts of 2**30 gate/up elements each (6.4 GB a weight stack in bf16): the last one
    starts at element 2**31, which a 32-bit offset would wrap."""
    hidden, inter, experts = 2048, 2**18, 3
    gate_up, down = expert_weights(experts, hidden, inter, torch.bfloat16, "cuda")
    assert gate_up.stride(0) * (experts - 1) >= 2**31
    x = torch.randn(8, hidden, dtype=torch.bfloat16, device="cuda")
    weights, ids = route(8, experts, 2, "random", "cuda")
    ids[:, 0] = experts - 1
    _assert_close(moe.fused_moe(x, gate_up, down, weights, ids), moe.ref_fused_moe(x, gate_up, down, weights, ids), torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_fused_moe_in_cuda_graph_follows_the_replayed_routing() -> None:
    """Captured once, replayed on new x, weights and ids copied into the captured inputs: another
    random routing, every token on expert 0, an expert unused, ids outside the experts."""
    x, gate_up, down, weights, ids = moe_case(24, 8, 2, 256, 96, "random", torch.bfloat16, "cuda")
    out = moe.fused_moe(x, gate_up, down, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, gate_up, down, weights, ids)
    for how in ("random", "one", "unused", "outside"):
        new_weights, new_ids = route(24, 8, 2, how, "cuda")
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        x.copy_(torch.randn_like(x))
        graph.replay()
        _assert_close(out, moe.ref_fused_moe(x, gate_up, down, weights, ids), torch.bfloat16)


if __name__ == "__main__":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    passed = run_cases(small_cases("cpu", torch.float32)) + run_cases(small_cases("cpu", torch.float16))
    print(f"{passed} interpreted checks passed")
