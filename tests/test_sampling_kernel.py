"""The sampler's kernels against their plain-torch references: the exponential
race (and its noise function against its documented definition, and the
reference's draws against the distribution they sample) and the logits' row
maximum and log-sum-exp.

On CPU the kernel runs under the Triton interpreter in a subprocess
(``TRITON_INTERPRET=1`` must be set before triton is imported):
``python tests/test_sampling_kernel.py`` runs the small cases that way. On a CUDA
GPU it also runs at Llama-3's vocab size.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator

import pytest
import torch
import triton
import triton.language as tl

from kernel_cases import fresh_seed, interpreted_checks_passed, run_cases  # noqa: F401 (fresh_seed is an autouse fixture)

from baton.kernels import logits, sampling

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@triton.jit
def _noise_kernel(seeds_ptr, index_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    key, salt = sampling._seed_keys(tl.load(seeds_ptr + offs, mask=ok, other=0))
    index = tl.load(index_ptr + offs, mask=ok, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, sampling._exponential(index, key, salt), mask=ok)


def random_probs(batch: int, vocab: int, device: str) -> torch.Tensor:
    """Dense softmax rows, rows thinned to a few nonzeros (as after top-k), a
    one-hot row and an all-zero row."""
    probs = torch.softmax(3 * torch.randn(batch, vocab), dim=-1)
    for row in range(1, batch, 2):
        keep = torch.randperm(vocab)[: max(1, vocab // 50)]
        thinned = torch.zeros(vocab)
        thinned[keep] = probs[row, keep]
        probs[row] = thinned
    if batch > 2:
        probs[2] = 0.0
        probs[2, torch.randint(0, vocab, ())] = 1.0
    if batch > 3:
        probs[3] = 0.0
    return probs.to(device)


def random_seeds(batch: int, device: str) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, (batch,), dtype=torch.int64, device=device)


def check_race(device: str, batch: int, vocab: int, tile: int, splits: int) -> None:
    probs, seeds = random_probs(batch, vocab, device), random_seeds(batch, device)
    got = sampling.launch_exponential_race(probs, seeds, tile, splits)
    want = sampling.ref_exponential_race(probs, seeds)
    assert got.dtype == torch.int64 and got.shape == (batch,), (got.dtype, got.shape)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert torch.equal(sampling.exponential_race(probs, seeds), want)


def check_noise_bits(device: str, n: int) -> None:
    """The kernel's noise equals the reference's bit for bit."""
    seeds = random_seeds(n, device)
    index = torch.randint(0, 2**31 - 1, (n,), device=device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    _noise_kernel[(triton.cdiv(n, 1024),)](seeds, index, out, n, BLOCK=1024, enable_fp_fusion=False)
    want = sampling.exponential_noise(seeds, index)
    mismatched = (out.view(torch.int32) != want.view(torch.int32)).sum().item()
    assert mismatched == 0, f"{mismatched} of {n} noise values differ"


def random_logits(batch: int, vocab: int, device: str) -> torch.Tensor:
    """Spread-out logits with masked (-inf) entries; row 1 repeats its maximum at a later
    index, row 2 is all -inf, row 3 ties at one value throughout."""
    x = 8 * torch.randn(batch, vocab)
    x[torch.rand(batch, vocab) < 0.1] = float("-inf")
    if batch > 1:
        top = int(x[1].argmax())
        x[1, torch.randint(top, vocab, ())] = x[1, top]
    if batch > 2:
        x[2] = float("-inf")
    if batch > 3:
        x[3] = 1.5
    return x.to(device)


def check_max_logsumexp(device: str, batch: int, vocab: int, tile: int, splits: int | None,
                        dtype: torch.dtype = torch.float32) -> None:
    """Maximum and index equal the reference's exactly (the lowest index on ties), the
    log-sum-exp to float32 rounding; the default launch agrees. Half-precision logits
    give the statistics of their float32 copy."""
    x = random_logits(batch, vocab, device).to(dtype)
    got = logits.launch_max_logsumexp(x, tile, splits)
    want = logits.ref_max_logsumexp(x)
    assert [t.dtype for t in got] == [torch.float32, torch.int64, torch.float32], [t.dtype for t in got]
    assert torch.equal(got[0], want[0]), (got[0].tolist(), want[0].tolist())
    assert torch.equal(got[1], want[1]), (got[1].tolist(), want[1].tolist())
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    default = logits.max_logsumexp(x)
    assert torch.equal(default[1], want[1])
    torch.testing.assert_close(default[2], want[2], rtol=1e-5, atol=1e-5)
    if dtype != torch.float32:
        widened = logits.ref_max_logsumexp(x.float())
        assert torch.equal(got[0], widened[0]) and torch.equal(got[1], widened[1])
        torch.testing.assert_close(got[2], widened[2], rtol=1e-5, atol=1e-5)


def small_cases(device: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """The cases the interpreter can afford; also the first pass on GPU."""
    yield "noise bits", lambda: check_noise_bits(device, 50_000)
    grid = [(0, 10, 64, 1), (1, 1, 64, 1), (3, 1, 64, 1), (4, 100, 64, 1), (5, 1000, 64, 4), (6, 3000, 256, 3), (4, 777, 128, 100), (2, 128256, 2048, 8)]
    for batch, vocab, tile, splits in grid:
        yield f"race b{batch} v{vocab} tile{tile} splits{splits}", lambda b=batch, v=vocab, t=tile, s=splits: check_race(device, b, v, t, s)
    grid = [(0, 10, 64, 1), (1, 1, 64, 1), (4, 100, 64, 1), (5, 1000, 64, 4), (6, 3000, 256, 3), (4, 777, 128, 100), (2, 128256, 1024, 8)]
    for batch, vocab, tile, splits in grid:
        yield (f"max_logsumexp b{batch} v{vocab} tile{tile} splits{splits}",
               lambda b=batch, v=vocab, t=tile, s=splits: check_max_logsumexp(device, b, v, t, s))
    for dtype in (torch.bfloat16, torch.float16):
        yield (f"max_logsumexp {dtype} b5 v1000 tile64 splits4",
               lambda d=dtype: check_max_logsumexp(device, 5, 1000, 64, 4, d))


@pytest.mark.unit
def test_sampling_kernel_under_triton_interpreter() -> None:
    stdout = interpreted_checks_passed(__file__)
    expected = sum(1 for _ in small_cases("cpu"))
    assert f"{expected} interpreted checks passed" in stdout, stdout


@pytest.mark.unit
def test_wrapper_rejects_bad_arguments() -> None:
    probs, seeds = torch.rand(3, 10), torch.zeros(3, dtype=torch.int64)
    bad = [
        ((probs.double(), seeds), "dtype"),
        ((probs[0], seeds), "shape"),
        ((probs.t(), seeds), "contiguous"),
        ((probs[:, :0], seeds), "at least one column"),
        ((probs, seeds[:2]), "shape"),
        ((probs, seeds.int()), "dtype"),
        ((probs, torch.zeros(6, dtype=torch.int64)[::2]), "contiguous"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            sampling.exponential_race(*args)
    for x, message in [(probs.double(), "dtype"), (probs[0], "shape"), (probs.t(), "contiguous"), (probs[:, :0], "at least one column")]:
        with pytest.raises(ValueError, match=message):
            logits.max_logsumexp(x)


def _f32(x: float) -> float:
    """Round a double to float32 (exact for a +, -, * or / of float32 operands)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def documented_noise(seed: int, index: int) -> float:
    """The noise exactly as the ``kernels.sampling`` docstring defines it, in plain Python."""
    lo, hi = seed % 2**32, (seed >> 32) % 2**32
    salt = _mix(hi ^ 0x9E3779B9)
    key = _mix(lo ^ salt)
    h = _mix((_mix(index ^ key) + salt) % 2**32)
    v = min(_f32(_f32(float(h)) * 2**-32 + 2**-33), _f32(1 - 2**-24))
    b = _bits(_f32(1 - v)) + 0x4AFB0D
    k = (b >> 23) - 127
    m = struct.unpack("<f", struct.pack("<I", (b & 0x7FFFFF) + 0x3F3504F3))[0]
    s = _f32((v if k == 0 else _f32(1 - m)) / _f32(1 + m))
    z = _f32(s * s)
    c3, c5, c7, c9, ln2 = (_f32(c) for c in (1 / 3, 1 / 5, 1 / 7, 1 / 9, math.log(2)))
    t = _f32(_f32(_f32(_f32(_f32(_f32(_f32(_f32(c9 * z) + c7) * z) + c5) * z) + c3) * z) + 1)
    return _f32(_f32(_f32(s + s) * t) - _f32(k * ln2))


@pytest.mark.unit
def test_noise_matches_its_documented_definition() -> None:
    seeds = torch.randint(-(2**63), 2**63 - 1, (300,))
    index = torch.randint(0, 2**31 - 1, (300,))
    got = sampling.exponential_noise(seeds, index).tolist()
    assert got == [documented_noise(s, i) for s, i in zip(seeds.tolist(), index.tolist())]


# (seed, index) -> float32 bits of E: the cross-process contract must not change silently.
GOLDEN_NOISE = [
    (0, 0, 0x3F60F041),
    (0, 1, 0x3F93E40D),
    (1, 0, 0x3EC271B0),
    (2**32, 0, 0x3E575557),
    (2**63 - 1, 128255, 0x3E92AFC1),
    (2283700763575104319, 7, 0x3FCD4F38),   # sample_seed(1234, 0)
    (-1, 5, 0x3B21DE3A),                    # E ~ 0.0025: the k == 0 branch
    (7, 153, 0x3C069768),
    (7, 176, 0x41022873),                   # E ~ 8.13
]


@pytest.mark.unit
def test_noise_golden_values() -> None:
    seeds = torch.tensor([s for s, _, _ in GOLDEN_NOISE])
    index = torch.tensor([i for _, i, _ in GOLDEN_NOISE])
    got = [b & 0xFFFFFFFF for b in sampling.exponential_noise(seeds, index).view(torch.int32).tolist()]
    assert got == [bits for _, _, bits in GOLDEN_NOISE]
    assert [documented_noise(s, i) for s, i, _ in GOLDEN_NOISE] == sampling.exponential_noise(seeds, index).tolist()


@pytest.mark.unit
def test_noise_is_exponential() -> None:
    """Moments and tail probabilities of Exp(1) over fresh seeds and indices."""
    noise = sampling.exponential_noise(torch.randint(0, 2**63 - 1, (200, 1)), torch.arange(1000)).double()
    assert abs(noise.mean().item() - 1) < 0.01 and abs(noise.var().item() - 1) < 0.03
    for x in (0.001, 0.1, 1.0, 3.0, 6.0):
        assert abs((noise > x).double().mean().item() - math.exp(-x)) < 5 * math.sqrt(math.exp(-x) / noise.numel()) + 1e-4, x
    adjacent = torch.corrcoef(torch.stack([noise[:, :-1].flatten(), noise[:, 1:].flatten()]))[0, 1]
    neighbour_seeds = torch.corrcoef(torch.stack([noise[:-1].flatten(), noise[1:].flatten()]))[0, 1]
    assert abs(adjacent) < 0.01 and abs(neighbour_seeds) < 0.01


@pytest.mark.unit
def test_reference_draws_follow_probs() -> None:
    """Chi-square of the reference's draws over fresh seeds against ``probs``: the
    argmax of probs, or uniform instead of exponential noise, fails by far."""
    probs = torch.tensor([0.4, 0.25, 0.0, 0.15, 0.1, 0.06, 0.0, 0.03, 0.01])
    draws = 40_000
    seeds = torch.randint(0, 2**63 - 1, (draws,))
    counts = torch.bincount(sampling.ref_exponential_race(probs.expand(draws, -1).contiguous(), seeds), minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    expected = probs[probs > 0] * draws
    chi2 = ((counts[probs > 0] - expected) ** 2 / expected).sum().item()
    # 6 degrees of freedom: P(chi2 > 40) < 1e-6. Uniform noise scores ~1,000 here.
    assert chi2 < 40, (chi2, counts.tolist())


@pytest.mark.gpu
@needs_cuda
def test_sampling_kernel_on_gpu() -> None:
    assert run_cases(small_cases("cuda")) > 0
    check_noise_bits("cuda", 1 << 22)
    for batch in (1, 64, 200):
        probs, seeds = random_probs(batch, 128256, "cuda"), random_seeds(batch, "cuda")
        assert torch.equal(sampling.exponential_race(probs, seeds), sampling.ref_exponential_race(probs, seeds))
        assert torch.equal(sampling.exponential_race(probs, seeds).cpu(), sampling.ref_exponential_race(probs.cpu(), seeds.cpu()))
        check_max_logsumexp("cuda", batch, 128256, logits.TILE, None)
        check_max_logsumexp("cuda", batch, 128256, logits.TILE, None, torch.bfloat16)


if __name__ == "__main__":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"{run_cases(small_cases('cpu'))} interpreted checks passed")
