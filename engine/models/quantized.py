"""Quantized linear layers in the model (``engine/quantization.py`` says which checkpoints and
flags make them): ``Fp8Linear`` holds an E4M3 weight and fp32 scales, one per output channel or,
from a block-wise checkpoint, one per block of the weight, and ``quantize_linears`` puts one in
place of each linear layer of the decoder layers' attention and dense MLPs, before the checkpoint
loads (the loader fills or quantizes them)."""

from __future__ import annotations

import torch
from torch import nn

from baton.kernels.fp8 import FP8_DTYPE, ref_quantize_rows
from baton.kernels.norm import norm_takes_group

QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class Fp8Linear(nn.Module):
    """``weight`` ``[out, in]`` in E4M3, ``weight_scale`` (fp32) ``[out]``, or with a ``block``
    ``(bn, bk)`` one per block, ``[ceil(out / bn), ceil(in / bk)]``, ``bias`` ``[out]`` in the
    model's dtype or None; ``ops.linear`` computes with them (``kernels/fp8.py``)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 block: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        scales = (out_features,) if block is None else (-(-out_features // block[0]), -(-in_features // block[1]))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(scales, dtype=torch.float32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(torch.empty_like(bias), requires_grad=False)


def weight_scale(layer: nn.Module | None) -> torch.Tensor | None:
    """An ``Fp8Linear``'s weight scales; None for an unquantized layer."""
    return layer.weight_scale if isinstance(layer, Fp8Linear) else None


def weight_block(layer: nn.Module | None) -> tuple[int, int] | None:
    """A block-scaled ``Fp8Linear``'s block ``(bn, bk)``; None for any other layer."""
    return layer.block if isinstance(layer, Fp8Linear) else None


def takes_fp8_rows(layer: nn.Module | None) -> bool:
    """Whether ``layer`` is FP8 and takes its input's rows quantized before it by the RMSNorm that
    makes them (``ops.rms_norm_fp8``): per token where it is scaled per output channel, per token and
    group of ``bk`` where per ``(bn, bk)`` block and the norm takes that group (``norm_takes_group``)."""
    if weight_scale(layer) is None:
        return False
    return layer.block is None or norm_takes_group(layer.block[1], layer.in_features)


def quantize_linears(model: nn.Module, block: tuple[int, int] | None = None) -> None:
    """Swap every ``nn.Linear`` named in ``QUANTIZED_PROJECTIONS`` for an ``Fp8Linear`` of its shape,
    scaled per ``block`` (None: per output channel), on the meta device, before the weights load.
    Embeddings and the LM head stay as they are."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in QUANTIZED_PROJECTIONS:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    Fp8Linear(module.in_features, module.out_features, module.bias, block))


def quantize_rows_into(weight: torch.Tensor, scale: torch.Tensor, tensor: torch.Tensor) -> None:
    """Quantize an unquantized checkpoint tensor (``[rows, in]``) into rows of an ``Fp8Linear``'s
    ``weight`` and ``weight_scale``, on their device."""
    q, s = ref_quantize_rows(tensor.to(weight.device))
    weight.copy_(q)
    scale.copy_(s)


def checkpoint_scale(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's ``weight_scale`` (one per tensor: ``[]`` or ``[1]``; or one per output
    channel: ``[rows]`` or ``[rows, 1]``) as ``rows`` fp32 scales."""
    flat = tensor.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(rows)
    if flat.numel() != rows or tensor.dim() > 2 or (tensor.dim() == 2 and tensor.shape[1] != 1):
        raise ValueError(f"a weight scale of shape {tuple(tensor.shape)} is neither one per tensor nor one for "
                         f"each of {rows} output channels")
    return flat
