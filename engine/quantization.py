"""Which weight quantization a model runs with: a checkpoint's ``quantization_config``, or vLLM's
``--quantization`` on an unquantized checkpoint (quantized as it loads).

One scheme is served, FP8 (E4M3) W8A8 (``baton.kernels.fp8``): every linear layer of the decoder
layers holds its weight in E4M3 with fp32 scales, and quantizes its input as it comes. The
embeddings and the LM head stay in the model's dtype; mixture-of-experts models are refused (their
experts would stay unquantized). Checkpoints read:

* ``quant_method: fp8`` (vLLM's and AutoFP8's): a scale per tensor (``<proj>.weight_scale``),
  spread over its output channels;
* ``quant_method: fp8`` with ``weight_block_size: [bn, bk]`` (DeepSeek-V3's and Qwen3-*-FP8's): a
  scale per ``bn x bk`` block of the weight (``<proj>.weight_scale_inv``, a multiplier despite its
  name), and inputs scaled per token and group of ``bk`` features (``checkpoint_weight_block``);
  on CUDA, decode's rows take the block-scaled GEMV and larger batches cuBLAS's or Triton's
  block-scaled GEMM (``fp8.block_fp8_linear``); the torch reference elsewhere (``kernels/fp8.py``);
* ``quant_method: compressed-tensors`` (LLM Compressor's FP8 schemes): 8-bit float weights scaled
  per tensor or per channel, or per ``bn x bk`` block (its FP8_BLOCK scheme: weights' ``strategy:
  block`` with a ``block_structure``, inputs' ``strategy: group`` of ``bk`` features, dynamic; the
  scales named ``<proj>.weight_scale``), computed as the ``fp8`` block-wise ones are.

Without blocks, inputs are always scaled per token, as they come: a checkpoint's static input scales
(``fp8``'s ``activation_scheme: static``, compressed-tensors' per-tensor ``input_activations``; the
``<proj>.input_scale`` tensors) are read past, not used. vLLM uses those, and scales a ``fp8``
checkpoint's dynamic inputs per tensor; per token is finer (no input clips at a calibrated bound)
and the one form of the kernels, so outputs sit a rounding closer to the unquantized model's than
vLLM's, not equal to them. Refused, by name: block-wise weight scales with static input scales,
integer or 4-bit schemes, weight-only schemes, quantized KV-cache scales, and layers left
unquantized other than the LM head.
"""

from __future__ import annotations

from typing import Any

QUANTIZATION_METHODS = ("fp8",)
_LM_HEAD = ("lm_head", "re:.*lm_head", "re:.*lm_head$")


def checkpoint_quantization(cfg: dict[str, Any]) -> str | None:
    """The scheme of a ``config.json``'s ``quantization_config`` ("fp8"), None without one;
    ValueError naming what is not served."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "fp8":
        _check_fp8(qc)
    elif method == "compressed-tensors":
        _check_compressed_tensors(qc)
    else:
        raise ValueError(f"quantization method {method!r} is not supported; supported: fp8 and compressed-tensors "
                         "FP8 (8-bit float weights and inputs)")
    return "fp8"


def _check_unquantized(layers: Any, field: str) -> None:
    if any(name not in _LM_HEAD for name in layers or ()):
        raise ValueError(f"quantization_config {field} {layers!r}: only the LM head may be left unquantized")


def checkpoint_weight_block(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """The ``(bn, bk)`` of a block-wise checkpoint (``fp8``'s ``weight_block_size``, compressed-tensors'
    ``block_structure``; call it once ``checkpoint_quantization`` has checked the config); None for
    any other config."""
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        block = qc.get("weight_block_size")
    elif qc.get("quant_method") == "compressed-tensors":
        block = _compressed_tensors_weights(qc).get("block_structure")
    else:
        block = None
    return None if block is None else (block[0], block[1])


def checkpoint_block_scale_suffix(cfg: dict[str, Any]) -> str:
    """The name a block-wise checkpoint gives its weight scales: ``fp8``'s ``weight_scale_inv``,
    compressed-tensors' ``weight_scale``."""
    return ".weight_scale_inv" if (cfg.get("quantization_config") or {}).get("quant_method") == "fp8" else ".weight_scale"


def _is_block(block: Any) -> bool:
    """Two positive ints ``[bn, bk]``."""
    return (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))


def _check_fp8(qc: dict[str, Any]) -> None:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported: dynamic or static")
    block = qc.get("weight_block_size")
    if block is not None:
        if not _is_block(block):
            raise ValueError(f"fp8 weight_block_size {block!r} is not supported: two positive ints [bn, bk]")
        if scheme != "dynamic":
            raise ValueError(f"fp8 weight_block_size {block} with activation_scheme {scheme!r} is not supported: "
                             "block-wise checkpoints' inputs are quantized per token and group as they come (dynamic)")
    for field in ("ignored_layers", "modules_to_not_convert"):
        _check_unquantized(qc.get(field), field)


def _check_compressed_tensors(qc: dict[str, Any]) -> None:
    if qc.get("format") not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {qc.get('format')!r} is not supported: FP8 "
                         "(float-quantized) only")
    if qc.get("kv_cache_scheme") is not None:
        raise ValueError("compressed-tensors kv_cache_scheme is not supported: the KV cache is not scaled "
                         "(--kv-cache-dtype fp8 stores it unscaled)")
    _check_unquantized(qc.get("ignore"), "ignore")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors needs one config group for every Linear layer, got {len(groups)}")
    group = next(iter(groups.values()))
    if group.get("targets") != ["Linear"]:
        raise ValueError(f"compressed-tensors targets {group.get('targets')!r}: only ['Linear'] is supported")
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    block = weights.get("block_structure") if weights.get("strategy") == "block" else None
    if not (weights.get("type") == "float" and weights.get("num_bits") == 8
            and (weights.get("strategy") in ("tensor", "channel") or _is_block(block)) and not weights.get("dynamic")
            and weights.get("symmetric", True)):
        raise ValueError(f"compressed-tensors weights {weights!r}: only 8-bit float weights, symmetric, scaled per "
                         "tensor, per channel or per block (a block_structure of two positive ints), are supported")
    if not (isinstance(inputs, dict) and inputs.get("type") == "float" and inputs.get("num_bits") == 8):
        raise ValueError(f"compressed-tensors input_activations {inputs!r}: only 8-bit float inputs are supported "
                         "(weight-only schemes are not)")
    scaled = (inputs.get("strategy"), bool(inputs.get("dynamic")))
    if block is not None and (scaled != ("group", True) or inputs.get("group_size") != block[1]):
        raise ValueError(f"compressed-tensors input_activations {inputs!r} with weights in {block} blocks: only inputs "
                         f"scaled per token and group of {block[1]} features as they come (dynamic) are supported")
    if block is None and scaled not in (("token", True), ("tensor", False)):
        raise ValueError(f"compressed-tensors input_activations {inputs!r}: only 8-bit float inputs, scaled per token "
                         "as they come or per tensor by a static scale, are supported (weight-only schemes are not)")


def _compressed_tensors_weights(qc: dict[str, Any]) -> dict[str, Any]:
    """The weights' scheme of a compressed-tensors config's one group (``_check_compressed_tensors``)."""
    return next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}


def resolve_quantization(requested: str | None, checkpoint: str | None, moe: bool) -> str | None:
    """The scheme a model runs with: the checkpoint's, or ``requested`` (``--quantization``, one of
    ``QUANTIZATION_METHODS``: ``EngineConfig`` checks it) on an unquantized one (with FP8 the only
    scheme, the two cannot disagree); ValueError where the model cannot take it."""
    scheme = checkpoint or requested
    if scheme is not None and moe:
        raise ValueError(f"{scheme} quantization of mixture-of-experts models is not supported")
    return scheme
