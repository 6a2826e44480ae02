"""FP8 (W8A8) models: which checkpoints and flags make them (``engine/quantization.py``), that an
FP8 checkpoint computes what transformers computes with its weights dequantized and each linear
layer's input rounded to E4M3 per token (per token and group of ``bk`` features for a block-wise
checkpoint, whose reference ``ref_fp8_block_linear`` is checked against its formula here too), and
that ``--quantization fp8`` on an unquantized checkpoint is the checkpoint an FP8 tool would have
written from it.

The comparisons with transformers are exact to float32's last bits only while no input lands so near
the midpoint of two E4M3 values that the two sides' float32 sums round it apart; the random
checkpoints and prompts here are seeded (``random_checkpoint``), and none does on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from baton.engine.config import EngineConfig
from baton.engine.model_config import ModelConfig
from baton.engine.model_runner import ModelRunner
from baton.engine.quantization import checkpoint_quantization, resolve_quantization
from baton.kernels import fp8, ops, rotary
from baton.kernels import linear as gemv
from baton.kernels.activation import ref_act_and_mul
from test_kernels import rotary_write_case
from test_model_parity import all_logits, random_checkpoint

E4M3 = torch.float8_e4m3fn
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
PER_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}


def fp8_blocks(block: list[int]) -> dict:
    """A block-wise ``fp8`` config as DeepSeek-V3's and Qwen3-*-FP8's ``config.json`` give it."""
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block}


def compressed_tensors(strategy: str = "channel", inputs: dict | None = PER_TOKEN, **extra) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "dynamic": False, "symmetric": True}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": group}, **extra}


STATIC_INPUTS = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def compressed_tensors_blocks(block: list[int], inputs: dict | None = None) -> dict:
    """LLM Compressor's FP8_BLOCK scheme: weights per ``bn x bk`` block, inputs (by default) per token
    and group of ``bk`` features as they come."""
    qc = compressed_tensors("block", inputs or {**PER_TOKEN, "strategy": "group", "group_size": block[1]})
    qc["config_groups"]["group_0"]["weights"]["block_structure"] = block
    return qc


def block_of(qc: dict) -> list[int] | None:
    """A config's weight block: ``fp8``'s ``weight_block_size`` or compressed-tensors' ``block_structure``."""
    if qc.get("quant_method") == "fp8":
        return qc.get("weight_block_size")
    return qc["config_groups"]["group_0"]["weights"].get("block_structure")


@pytest.mark.unit
@pytest.mark.parametrize("qc", [
    {"quant_method": "fp8", "activation_scheme": "dynamic"},
    {"quant_method": "fp8", "activation_scheme": "static"},
    {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]},
    compressed_tensors("channel"),
    compressed_tensors("tensor"),
    compressed_tensors("tensor", STATIC_INPUTS),
    {**fp8_blocks([128, 128]), "ignored_layers": ["lm_head"]},
    compressed_tensors_blocks([128, 128]),
], ids=["fp8", "fp8-static", "fp8-lm-head-ignored", "ct-channel", "ct-tensor", "ct-static", "fp8-block", "ct-block"])
def test_fp8_checkpoint_configs_are_read(qc: dict) -> None:
    assert checkpoint_quantization({"quantization_config": qc}) == "fp8"
    assert checkpoint_quantization({}) is None


@pytest.mark.unit
def test_the_model_config_carries_a_checkpoints_block() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 128}
    blocked = ModelConfig.from_dict({**base, "quantization_config": fp8_blocks([128, 64])})
    assert (blocked.quantization, blocked.weight_block_size, blocked.block_scale_suffix) == ("fp8", (128, 64),
                                                                                              ".weight_scale_inv")
    blocked = ModelConfig.from_dict({**base, "quantization_config": compressed_tensors_blocks([64, 32])})
    assert (blocked.quantization, blocked.weight_block_size, blocked.block_scale_suffix) == ("fp8", (64, 32),
                                                                                              ".weight_scale")
    per_tensor = ModelConfig.from_dict({**base, "quantization_config": {"quant_method": "fp8"}})
    assert (per_tensor.quantization, per_tensor.weight_block_size) == ("fp8", None)
    assert ModelConfig.from_dict(base).weight_block_size is None


@pytest.mark.unit
@pytest.mark.parametrize("qc,says", [
    ({"quant_method": "fp8", "activation_scheme": "per-group"}, "activation_scheme 'per-group'"),
    ({**fp8_blocks([128, 128]), "activation_scheme": "static"},
     "weight_block_size [128, 128] with activation_scheme 'static' is not supported"),
    (fp8_blocks([128]), "weight_block_size [128] is not supported: two positive ints"),
    (fp8_blocks([128, 0]), "weight_block_size [128, 0] is not supported: two positive ints"),
    (fp8_blocks([128, 64.0]), "weight_block_size [128, 64.0] is not supported: two positive ints"),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj"]}, "only the LM head"),
    ({"quant_method": "awq", "bits": 4}, "quantization method 'awq'"),
    (compressed_tensors(inputs=None), "weight-only"),
    (compressed_tensors(inputs={**PER_TOKEN, "strategy": "tensor"}), "input_activations"),
    (compressed_tensors(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    ({**compressed_tensors(), "format": "pack-quantized"}, "format 'pack-quantized'"),
    (compressed_tensors("group"), "scaled per tensor, per channel or per block"),
    (compressed_tensors("block"), "scaled per tensor, per channel or per block"),
    (compressed_tensors_blocks([128, 128], PER_TOKEN), "with weights in [128, 128] blocks"),
    (compressed_tensors_blocks([128, 128], {**PER_TOKEN, "strategy": "group", "group_size": 64}),
     "group of 128 features"),
], ids=["per-group-inputs", "block-wise-static-inputs", "block-of-one-int", "block-of-zero", "block-of-a-float",
        "ignored-layer", "awq", "weight-only", "dynamic-per-tensor-inputs", "kv-scales", "int4", "groups",
        "ct-block-without-structure", "ct-block-per-token-inputs", "ct-block-other-group-size"])
def test_unserved_quantization_configs_are_refused_by_name(qc: dict, says: str) -> None:
    with pytest.raises(ValueError, match=f".*{says.replace('[', '.').replace(']', '.')}"):
        checkpoint_quantization({"quantization_config": qc})


@pytest.mark.unit
def test_the_flag_and_the_checkpoint_must_agree() -> None:
    assert resolve_quantization(None, None, moe=False) is None
    assert resolve_quantization("fp8", None, moe=False) == "fp8"
    assert resolve_quantization(None, "fp8", moe=False) == "fp8"
    assert resolve_quantization("fp8", "fp8", moe=False) == "fp8"
    with pytest.raises(ValueError, match="mixture-of-experts"):
        resolve_quantization("fp8", None, moe=True)
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        EngineConfig(quantization="int8")


def quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What an FP8 tool writes for ``w``: E4M3 values and their scale (``[rows, 1]`` per channel,
    ``[]`` per tensor), the largest magnitude of each row (or of all) taken to 448."""
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = amax.clamp(min=1e-12) * (1.0 / 448.0)
    return (w * (1.0 / scale)).clamp(-448, 448).to(E4M3), scale


def quantize_blocks(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a block-wise FP8 tool writes for ``w``: E4M3 values and a scale per ``bn`` x ``bk`` block
    (the last ones shorter where they do not divide ``w``), each block's largest magnitude taken to
    448; and the dequantized weight."""
    q, dequantized = torch.empty_like(w, dtype=E4M3), torch.empty_like(w)
    scale = torch.empty(-(-w.shape[0] // bn), -(-w.shape[1] // bk))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            scale[i, j] = w[rows, cols].abs().amax().clamp(min=1e-12) * (1.0 / 448.0)
            q[rows, cols] = (w[rows, cols] * (1.0 / scale[i, j])).clamp(-448, 448).to(E4M3)
            dequantized[rows, cols] = q[rows, cols].float() * scale[i, j]
    return q, scale, dequantized


def write_fp8_checkpoint(src: Path, dst: Path, qc: dict, per_channel: bool,
                         input_scales: bool = False) -> dict[str, torch.Tensor]:
    """``src``'s checkpoint with its decoder layers' projections in E4M3 beside their scales (and a
    static input scale each, with ``input_scales``: calibrated too small, so inputs scaled by it would
    clip), under ``qc``; returns the dequantized weights by name. With ``qc``'s block (``block_of``), a
    scale per block, named ``weight_scale_inv`` (``fp8``) or ``weight_scale`` (compressed-tensors)."""
    dst.mkdir()
    tensors, dequantized = load_file(src / "model.safetensors"), {}
    block, suffix = block_of(qc), "_scale_inv" if qc["quant_method"] == "fp8" else "_scale"
    for name in [n for n in tensors if n.startswith("model.layers.") and n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS]:
        if block:
            tensors[name], tensors[name + suffix], dequantized[name] = quantize_blocks(tensors[name], *block)
            continue
        q, scale = quantize(tensors[name], per_channel)
        tensors[name], tensors[name.removesuffix("weight") + "weight_scale"] = q, scale
        if input_scales:
            tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor(1e-4)
        dequantized[name] = q.float() * scale
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return dequantized


def fake_quantized_transformers(hf: nn.Module, dequantized: dict[str, torch.Tensor], group: int | None = None) -> nn.Module:
    """``hf`` with the dequantized weights, each of those layers rounding its input to E4M3 per token
    first (scaled by the largest magnitude of each token's row; with a ``group``, of each run of
    ``group`` features of the row): W8A8's arithmetic in float32."""
    def round_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        rounded = []
        for x in args[0].split(group or args[0].shape[-1], dim=-1):
            scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) * (1.0 / 448.0)
            rounded.append((x * (1.0 / scale)).clamp(-448, 448).to(E4M3).float() * scale)
        return (torch.cat(rounded, dim=-1),)

    with torch.no_grad():
        for name, weight in dequantized.items():
            module = hf.get_submodule(name.removesuffix(".weight"))
            module.weight.copy_(weight)
            module.register_forward_pre_hook(round_input)
    return hf


# Biases on every projection (4 KV heads); Qwen3's q/k norms; Phi-3's fused q/k/v and gate/up in the
# checkpoint (one scale per fused tensor); Granite's residual multiplier folded into the scales.
ARCHITECTURES = ["llama-linear-rope-bias", "qwen3", "phi3", "granite-bias-untied"]


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("qc,per_channel,input_scales", [
    (compressed_tensors("channel"), True, False), ({"quant_method": "fp8", "activation_scheme": "dynamic"}, False, False),
    ({"quant_method": "fp8", "activation_scheme": "static"}, False, True),
], ids=["compressed-tensors-channel", "fp8-tensor", "fp8-static-inputs"])
def test_fp8_checkpoint_logits_match_transformers_rounding_each_input(name: str, qc: dict, per_channel: bool,
                                                                        input_scales: bool, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per token, whatever the checkpoint calibrated: static input scales are read past. The q/k/v and
    gate/up projections take the rows their RMSNorm rounded (``ops.rms_norm_fp8``, two a layer)."""
    norms = count_calls(monkeypatch, "rms_norm_fp8")
    hf = random_checkpoint(name, tmp_path / "float")
    dequantized = write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", qc, per_channel, input_scales)
    reference = fake_quantized_transformers(hf, dequantized)
    tokens = torch.randint(0, hf.config.vocab_size, (23,)).tolist()
    runner = ModelRunner(str(tmp_path / "fp8"), EngineConfig(block_size=4, num_blocks=32))
    assert runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == E4M3
    ours = all_logits(runner, tokens[:19], tokens[19:])
    with torch.inference_mode():
        ref = reference(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert norms and len(norms) % (2 * runner.model_config.num_layers) == 0


def count_calls(monkeypatch: pytest.MonkeyPatch, op: str) -> list[int]:
    """A list that gains an entry at each call of ``ops.<op>`` (which still runs)."""
    calls: list[int] = []
    real = getattr(ops, op)
    monkeypatch.setattr(ops, op, lambda *args: calls.append(1) or real(*args))
    return calls


# (bn, bk): N in several blocks and K (64, 96, 128) in several groups, the last one shorter. Phi-3's
# checkpoint fuses q/k/v and gate/up, so its blocks need not split the shards: bn 48 leaves a shorter
# last block of rows too. Granite's residual multiplier folds into the block scales.
# LLM Compressor's FP8_BLOCK checkpoints compute the same, their scales named weight_scale. Groups of
# 32 (a power of two, as in every published checkpoint) come from the RMSNorm for q/k/v and
# gate/up.
@pytest.mark.parametrize("name,block,blocks", [("llama-linear-rope-bias", [32, 40], fp8_blocks),
                                               ("qwen3", [32, 40], fp8_blocks),
                                               ("granite-bias-untied", [32, 40], fp8_blocks),
                                               ("phi3", [48, 40], fp8_blocks),
                                               ("qwen3", [32, 40], compressed_tensors_blocks),
                                               ("llama-linear-rope-bias", [32, 32], fp8_blocks),
                                               ("phi3", [48, 32], compressed_tensors_blocks)],
                         ids=["llama", "qwen3", "granite", "phi3", "qwen3-compressed-tensors", "llama-bk32",
                              "phi3-compressed-tensors-bk32"])
def test_block_fp8_checkpoint_logits_match_transformers_rounding_each_group(name: str, block: list[int], blocks,
                                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With groups of 40 each projection quantizes its rows per group itself; with a power of two, the
    q/k/v and gate/up projections take the rows their RMSNorm rounded per group (``ops.rms_norm_fp8``,
    two a layer)."""
    norms = count_calls(monkeypatch, "rms_norm_fp8")
    hf = random_checkpoint(name, tmp_path / "float")
    dequantized = write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", blocks(block), per_channel=False)
    reference = fake_quantized_transformers(hf, dequantized, group=block[1])
    tokens = torch.randint(0, hf.config.vocab_size, (23,)).tolist()
    runner = ModelRunner(str(tmp_path / "fp8"), EngineConfig(block_size=4, num_blocks=32))
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert runner.model_config.weight_block_size == tuple(block)
    assert (qkv.weight.dtype, qkv.block, qkv.weight_scale.shape[1]) == (E4M3, tuple(block), -(-64 // block[1]))
    ours = all_logits(runner, tokens[:19], tokens[19:])
    with torch.inference_mode():
        ref = reference(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    if block[1] == 40:
        assert norms == []
    else:
        assert norms and len(norms) % (2 * runner.model_config.num_layers) == 0


def test_block_scales_must_split_each_fused_shard_into_whole_blocks(tmp_path: Path) -> None:
    """Qwen3's q rows (128) are not whole blocks of 48: q/k/v's scales cannot share the fused layer's."""
    random_checkpoint("qwen3", tmp_path / "float")
    write_fp8_checkpoint(tmp_path / "float", tmp_path / "uneven", fp8_blocks([48, 40]), per_channel=False)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.qkv_proj fuses shards of \\{'q': 128, 'k': 64, "
                                         "'v': 64\\} rows, not each a whole number of 48-row blocks"):
        ModelRunner(str(tmp_path / "uneven"), EngineConfig(block_size=4, num_blocks=32))


def block_case(m: int, n: int, k: int, block: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Rows of several magnitudes (a group of zeros in one), an E4M3 weight ``[n, k]``, its block
    scales and a bias."""
    x = torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]
    x[min(1, m - 1), : block[1]] = 0
    w = (torch.randn(n, k) * 100).clamp(-448, 448).to(E4M3)
    return x, w, torch.rand(-(-n // block[0]), -(-k // block[1])) + 0.5, torch.randn(n)


@pytest.mark.unit
def test_the_block_reference_is_its_formula_group_by_group() -> None:
    """``ref_fp8_block_linear`` against its docstring's sum, written out group by group and block by
    block, with N and K not multiples of the block; ``ref_quantize_groups`` exactly."""
    (m, n, k), (bn, bk) = (5, 10, 21), (4, 8)
    x, w, ws, bias = block_case(m, n, k, (bn, bk))
    q, xs = fp8.ref_quantize_groups(x, bk)
    want = bias.repeat(m, 1)
    for i in range(m):
        for g in range(-(-k // bk)):
            xg = x[i, g * bk : (g + 1) * bk]
            scale = xg.abs().amax().clamp(min=1e-12) * (1.0 / 448.0)
            xq = (xg * (1.0 / scale)).clamp(-448, 448).to(E4M3)
            assert xs[i, g] == scale and torch.equal(q[i, g * bk : (g + 1) * bk].view(torch.uint8), xq.view(torch.uint8))
            for j in range(n):
                want[i, j] += (xq.float() * scale * w[j, g * bk : (g + 1) * bk].float() * ws[j // bn, g]).sum()
    got = fp8.ref_fp8_block_linear(x, w, ws, (bn, bk), bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert fp8.ref_fp8_block_linear(x.bfloat16(), w, ws, (bn, bk)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight_scale must have shape \\[3, 3\\], got \\[3, 2\\]"):
        fp8.ref_fp8_block_linear(x, w, ws[:, :2].contiguous(), (bn, bk))
    with pytest.raises(ValueError, match="block must be two positive ints"):
        fp8.ref_fp8_block_linear(x, w, ws, (bn, 0))


@pytest.mark.unit
@pytest.mark.parametrize("gemv_rows,block", [(False, (32, 16)), (True, (32, 40))], ids=["cpu", "decode-rows-bk-40"])
def test_ops_take_the_block_reference_where_no_kernel_takes_the_block(gemv_rows: bool, block: tuple[int, int],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``ops.linear``, ``gated_linear`` and ``qkv_rotary_store_kv`` compute block-scaled weights by
    the reference on the CPU, and where decode-sized CUDA rows meet a block the GEMV does not take (a
    ``bk`` not a power of two; the CUDA rows faked here)."""
    if gemv_rows:
        monkeypatch.setattr(ops, "_gemv_rows", lambda x: True)
        for module, name in [(gemv, "linear"), (gemv, "gated_linear"), (rotary, "qkv_rotary_store_kv")]:
            monkeypatch.setattr(module, name, lambda *args, **kwargs: pytest.fail("a block-scaled weight took a GEMV"))
    x, w, ws, bias = block_case(3, 128, 40, block)
    want = fp8.ref_fp8_block_linear(x, w, ws, block, bias)
    assert torch.equal(ops.linear(x, w, bias, ws, block), want)
    gated = torch.randn(3, 80)
    assert torch.equal(ops.gated_linear(gated, w, bias, "silu", ws, block),
                       fp8.ref_fp8_block_linear(ref_act_and_mul(gated, "silu"), w, ws, block, bias))
    pos, cos_sin, cache, slots = rotary_write_case(3, 2, 16, 16, torch.float32, torch.int64, "cpu")
    want_cache = cache.clone()
    want_q = rotary.ref_rotary_store_kv(pos, *rotary.split_qkv(want, 2, 16), cos_sin, want_cache, slots)
    got_q = ops.qkv_rotary_store_kv(x, w, bias, pos, cos_sin, cache, slots, ws, block)
    assert torch.equal(got_q, want_q) and torch.equal(cache, want_cache)


@pytest.mark.unit
def test_decode_rows_take_the_gemv_with_a_power_of_two_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-sized CUDA rows (faked) and a block whose ``bk`` is a power of two: ``ops.linear``,
    ``gated_linear`` and ``qkv_rotary_store_kv`` hand the block to the GEMVs."""
    block, calls = (32, 16), []

    def gemv_linear(x, w, bias, ws, blk, x_fp8):
        calls.append(("linear", blk))
        return fp8.ref_fp8_block_linear(x, w, ws, blk, bias)

    def gemv_gated(x, w, bias, activation, ws, blk):
        calls.append(("gated_linear", blk))
        return fp8.ref_fp8_block_linear(ref_act_and_mul(x, activation), w, ws, blk, bias)

    def fused_qkv(x, w, bias, pos, cos_sin, cache, slots, ws, blk, x_fp8):
        calls.append(("qkv_rotary_store_kv", blk))
        return rotary.ref_qkv_rotary_store_kv(x, w, bias, pos, cos_sin, cache, slots, ws, blk)

    monkeypatch.setattr(ops, "_gemv_rows", lambda x: True)
    monkeypatch.setattr(gemv, "linear", gemv_linear)
    monkeypatch.setattr(gemv, "gated_linear", gemv_gated)
    monkeypatch.setattr(rotary, "qkv_rotary_store_kv", fused_qkv)
    x, w, ws, bias = block_case(2, 128, 64, block)
    ops.linear(x, w, bias, ws, block)
    ops.gated_linear(torch.randn(2, 128), w, bias, "silu", ws, block)
    pos, cos_sin, cache, slots = rotary_write_case(2, 2, 16, 16, torch.float32, torch.int64, "cpu")
    ops.qkv_rotary_store_kv(x, w, bias, pos, cos_sin, cache, slots, ws, block)
    assert calls == [("linear", block), ("gated_linear", block), ("qkv_rotary_store_kv", block)]


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_quantizing_as_it_loads_is_the_per_channel_checkpoint(name: str, tmp_path: Path) -> None:
    """``--quantization fp8`` on an unquantized checkpoint computes exactly what the per-channel FP8
    checkpoint an FP8 tool writes from it computes."""
    random_checkpoint(name, tmp_path / "float")
    write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", compressed_tensors("channel"), per_channel=True)
    tokens = torch.randint(0, 128, (23,)).tolist()
    engine = EngineConfig(block_size=4, num_blocks=32)
    online = ModelRunner(str(tmp_path / "float"), EngineConfig(block_size=4, num_blocks=32, quantization="fp8"))
    assert torch.equal(all_logits(online, tokens[:19], tokens[19:]),
                       all_logits(ModelRunner(str(tmp_path / "fp8"), engine), tokens[:19], tokens[19:]))
    unquantized = all_logits(ModelRunner(str(tmp_path / "float"), engine), tokens[:19], tokens[19:])
    assert not torch.equal(all_logits(online, tokens[:19], tokens[19:]), unquantized)


@pytest.mark.parametrize("qc", [compressed_tensors("channel"), fp8_blocks([32, 40]), compressed_tensors_blocks([32, 40])],
                         ids=["per channel", "per block", "per block, compressed-tensors"])
def test_a_missing_or_misshapen_scale_is_named(tmp_path: Path, qc: dict) -> None:
    random_checkpoint("qwen3", tmp_path / "float")
    blocks = block_of(qc) is not None
    write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", qc, per_channel=not blocks)
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    engine = EngineConfig(block_size=4, num_blocks=32)
    scale = "model.layers.1.self_attn.k_proj.weight_scale" + ("_inv" if qc["quant_method"] == "fp8" else "")
    save_file({n: t for n, t in tensors.items() if n != scale}, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(ValueError, match=f"tensors missing from checkpoint .*{scale}"):
        ModelRunner(str(tmp_path / "fp8"), engine)
    rows, says = ((1, f"checkpoint tensor {scale} has shape \\(1, 2\\), expected \\(2, 2\\)") if blocks
                  else (3, "a weight scale of shape \\(3, 1\\) is neither one per tensor"))
    save_file({**tensors, scale: tensors[scale][:rows]}, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(ValueError, match=says):
        ModelRunner(str(tmp_path / "fp8"), engine)


def test_moe_models_refuse_fp8(tmp_path: Path) -> None:
    random_checkpoint("mixtral", tmp_path)
    with pytest.raises(ValueError, match="fp8 quantization of mixture-of-experts models is not supported"):
        ModelRunner(str(tmp_path), EngineConfig(block_size=4, num_blocks=32, quantization="fp8"))


@pytest.mark.unit
def test_gpus_without_8_bit_float_arithmetic_refuse_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before compute capability 8.9 (an A100's 8.0) neither the GEMV's E4M3 conversions nor cuBLAS's FP8
    GEMM exist: the runner says so by name instead of failing in a kernel's compile."""
    from baton.engine import model_runner

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="fp8 quantization: E4M3 weights need a GPU of compute capability 8.9 or later "
                                         "\\(Ada, Hopper\\); NVIDIA A100-SXM4-80GB has 8.0"):
        model_runner._require_fp8_device(torch.device("cuda"), "fp8 quantization: E4M3 weights")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    model_runner._require_fp8_device(torch.device("cuda"), "fp8 quantization: E4M3 weights")
    model_runner._require_fp8_device(torch.device("cpu"), "fp8 quantization: E4M3 weights")


@pytest.mark.parametrize("block", [None, [32, 40]], ids=["per-channel", "block"])
def test_an_adapter_on_an_fp8_model_adds_to_each_fp8_projection(block: list[int] | None, tmp_path: Path) -> None:
    """A LoRA adapter over an FP8 checkpoint (per channel or block-wise): each adapted projection is
    the FP8 product of the token's rounded input plus the adapter's delta of the input as it came
    (transformers' layers with a delta hooked on, of the input before the rounding hook)."""
    from lora_adapters import make_adapter

    hf = random_checkpoint("qwen3", tmp_path / "float")
    qc = compressed_tensors() if block is None else fp8_blocks(block)
    reference = fake_quantized_transformers(hf, write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", qc, per_channel=True),
                                            group=block and block[1])
    adapter = make_adapter(str(tmp_path / "fp8"), tmp_path / "adapter", rank=4, alpha=8, std=0.3)
    tensors, peft = load_file(adapter / "adapter_model.safetensors"), json.loads((adapter / "adapter_config.json").read_text())
    for key in [k for k in tensors if ".lora_A." in k]:
        module = reference.get_submodule(key.removeprefix("base_model.model.").split(".lora_A.")[0])
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        inputs: list[torch.Tensor] = []
        module.register_forward_pre_hook(lambda _m, args, inputs=inputs: inputs.append(args[0]), prepend=True)
        module.register_forward_hook(lambda _m, _a, out, a=a, b=b, inputs=inputs:
                                     out + inputs.pop() @ a.t() @ b.t() * (peft["lora_alpha"] / peft["r"]))
    tokens = torch.randint(0, 128, (23,)).tolist()
    runner = ModelRunner(str(tmp_path / "fp8"), EngineConfig(block_size=4, num_blocks=32, lora_modules={"a": str(adapter)}))
    ours = all_logits(runner, tokens[:19], tokens[19:], lora="a")
    with torch.inference_mode():
        ref = reference(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not torch.allclose(ours, all_logits(runner, tokens[:19], tokens[19:]), rtol=1e-2, atol=1e-2)
