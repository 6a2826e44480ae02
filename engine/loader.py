"""Finding a checkpoint and loading its safetensors weights into an engine model.

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``)
checkpoints load the same way. Hugging Face tensor names map onto the engine's
modules one to one, except q/k/v and gate/up, which are copied into slices of the
fused ``qkv_proj`` / ``gate_up_proj`` weights (a checkpoint that holds them fused, as
Phi-3's does, fills every slice at once). A mixture-of-experts layer's experts are stacked: each
expert's projections (``experts.<i>.gate_proj``..., Mixtral's ``block_sparse_moe.experts.<i>.w1``
/ ``w3`` / ``w2``) fill expert ``i``'s slice of ``experts.gate_up_proj`` / ``down_proj``; a
checkpoint holding them stacked already (Granite MoE's ``input_linear`` / ``output_linear``, or
transformers 5's names) fills all at once. An image-text checkpoint served as its text model
names that model's tensors under a prefix and holds others (``ModelConfig.weights_prefix``,
``skipped_weights``). Every other tensor must be used and every parameter filled; otherwise the
error names the offending tensors. An FP8 model's linear layers (``engine/models/quantized.py``)
take an FP8 checkpoint's E4M3 weights and their ``weight_scale`` tensors (its static
``input_scale`` tensors are read past), or quantize an unquantized checkpoint's weights as they load.
A block-wise FP8 checkpoint's ``weight_scale_inv`` tensors (compressed-tensors' ``weight_scale``: a
scale per block) fill those layers' 2-D ``weight_scale``; a fused layer's shard fills the scale rows
of its blocks, so each shard must be a whole number of blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from baton.engine.model_config import ModelConfig
from baton.engine.models import get_model_class
from baton.engine.models.llama import STACKED_PARAMS
from baton.engine.models.quantized import checkpoint_scale, quantize_linears, quantize_rows_into
from baton.kernels.fp8 import FP8_DTYPE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # buffers some old checkpoints saved
_STATIC_INPUT_SCALE = ".input_scale"            # an FP8 checkpoint's calibrated input scale, read past
_MAX_NAMES_IN_ERROR = 10
_FUSED_NAMES = frozenset(fused for fused, _ in STACKED_PARAMS.values())
_EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Granite MoE's stacked experts and router, by their engine names.
_GRANITE_MOE_NAMES = {".mlp.input_linear.weight": ".mlp.experts.gate_up_proj",
                      ".mlp.output_linear.weight": ".mlp.experts.down_proj", ".mlp.router.layer.weight": ".mlp.gate.weight"}


def resolve_model_dir(model: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local checkpoint directory as is, otherwise a Hugging Face hub id downloaded
    (or found in the local hub cache) with ``huggingface_hub.snapshot_download``: at ``revision``
    (a branch, tag or commit; None: the default branch), into ``download_dir`` (None: the hub's
    cache), as vLLM's ``--revision`` and ``--download-dir`` ask."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model {model!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # the hub client raises many types (offline, 404, auth, network)
        raise OSError(
            f"could not get model {model!r}: not a local directory, and downloading it from the "
            f"Hugging Face hub failed ({type(exc).__name__}: {exc})"
        ) from exc


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, each checked to exist."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing weight file(s) in {model_dir}: {', '.join(missing)}")
    return files


def build_model(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Instantiate ``config.architecture`` without random init and load its weights."""
    model_class = get_model_class(config.architecture)
    with torch.device("meta"):
        model = model_class(config).to(dtype)
        if config.quantization == "fp8":
            quantize_linears(model, config.weight_block_size)
    model = model.to_empty(device=device)
    load_weights(model_dir, model, dtype)
    model.fold_scales()
    return model.eval()


def load_weights(model_dir: Path, model: nn.Module, dtype: torch.dtype) -> None:
    """Copy every checkpoint tensor (cast to ``dtype``) into ``model``'s parameters. An FP8 layer's
    (``Fp8Linear``) weight takes an E4M3 tensor as it is, and its ``weight_scale`` the checkpoint's
    (spread over the rows where it is one per tensor; a block-wise checkpoint's block scales as they
    are); an unquantized tensor is quantized into both (per output channel)."""
    params = dict(model.named_parameters())
    needed = {name: _shard_keys(model, name) for name in params}
    filled: dict[str, set[str]] = {name: set() for name in params}
    unexpected: list[str] = []
    config = getattr(model, "config", None)
    tied = bool(config and config.tie_word_embeddings)
    prefix, skipped = (config.weights_prefix, config.skipped_weights) if config else ("", ())
    quantized = bool(config and config.quantization)
    block_scales = config.block_scale_suffix if config and config.weight_block_size else None
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = key.removeprefix(prefix)
                if key.startswith(skipped) or name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if quantized and name.endswith(_STATIC_INPUT_SCALE):
                    continue   # inputs are scaled per token as they come (engine/quantization.py)
                if block_scales and name.endswith(block_scales):
                    name = name.removesuffix(block_scales) + ".weight_scale"
                target, shard = _engine_name(name)
                if target not in params and f"model.{target}" in params:
                    target = f"model.{target}"           # a base model's checkpoint names no "model." prefix
                if target not in params:
                    unexpected.append(key)
                    continue
                for param_name in _load_tensor(model, params, target, shard, f.get_tensor(key), dtype, key):
                    filled[param_name].update(needed[param_name] if not shard else {shard})
    if unexpected:
        raise ValueError(f"unexpected tensors in checkpoint {model_dir}: {_names(unexpected)}")
    missing = [_scale_name(_hf_name(name, shard), block_scales) for name, keys in needed.items()
               for shard in sorted(keys - filled[name])]
    if missing:
        raise ValueError(f"tensors missing from checkpoint {model_dir}: {_names(missing)}")


def _scale_name(name: str, block_scales: str | None) -> str:
    """A parameter's checkpoint name: a weight scale under the name a block-wise checkpoint gives it."""
    return name.removesuffix(".weight_scale") + block_scales if block_scales and name.endswith(".weight_scale") else name


def _load_tensor(model: nn.Module, params: dict[str, nn.Parameter], target: str, shard: str, tensor: torch.Tensor,
                 dtype: torch.dtype, key: str) -> list[str]:
    """Copy one checkpoint tensor into ``target`` (and, quantizing it, into the scales beside it);
    returns the parameters it filled."""
    param = params[target]
    slot = _shard_of(model, param, target, shard, key)
    scales = target.endswith(".weight_scale")
    if scales and slot.dim() == 1:   # one per output channel (or one per tensor, spread over them)
        tensor = checkpoint_scale(tensor, slot.shape[0])
    if tuple(slot.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(slot.shape)}")
    if scales:   # fp32, never the model's dtype
        slot.copy_(tensor.float())
    elif param.dtype != FP8_DTYPE:
        slot.copy_(tensor.to(dtype))
    elif tensor.dtype == FP8_DTYPE:
        slot.copy_(tensor)
    else:   # an unquantized weight into an FP8 layer: quantized as it loads
        scale_name = target.removesuffix("weight") + "weight_scale"
        if params[scale_name].dim() == 2:
            raise ValueError(f"checkpoint tensor {key} is {tensor.dtype}: a block-wise FP8 checkpoint's projections "
                             "must be E4M3")
        quantize_rows_into(slot, _shard_of(model, params[scale_name], scale_name, shard, key), tensor.to(dtype))
        return [target, scale_name]
    return [target]


def _engine_name(key: str) -> tuple[str, str]:
    """HF tensor name -> (engine parameter name, shard key; "" when not fused). An expert's
    projection's shard key is ``"<expert>"`` (down) or ``"<expert>.<gate | up>"``."""
    key = key.replace(".block_sparse_moe.", ".mlp.")
    for granite, ours in _GRANITE_MOE_NAMES.items():
        if key.endswith(granite):
            return key.removesuffix(granite) + ours, ""
    expert = _EXPERT.search(key)
    if expert is not None:
        proj = _MIXTRAL_NAMES.get(expert[2], expert[2])
        fused, shard = STACKED_PARAMS.get(proj, (proj, ""))
        return f"{key[:expert.start()]}.experts.{fused}", f"{expert[1]}.{shard}" if shard else expert[1]
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in STACKED_PARAMS:
            fused, shard = STACKED_PARAMS[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard
    return key, ""


def _hf_name(name: str, shard: str) -> str:
    if not shard:
        return name
    experts = _experts(name)
    if experts is not None:
        expert, _, part = shard.partition(".")
        proj = next((p for p, (_, key) in STACKED_PARAMS.items() if part and key == part), experts[1])
        return f"{experts[0]}.{expert}.{proj}.weight"
    for proj, (fused, key) in STACKED_PARAMS.items():
        if key == shard and f".{fused}." in name:
            return name.replace(f".{fused}.", f".{proj}.")
    return f"{name}[{shard}]"


def _shard_layout(model: nn.Module, name: str) -> dict[str, int] | None:
    """Row sizes of the slices of a fused parameter (in order), or None when not fused."""
    parts = name.rsplit(".", 2)
    if len(parts) < 3 or parts[1] not in _FUSED_NAMES:
        return None
    return model.get_submodule(parts[0]).shard_sizes()


def _experts(name: str) -> tuple[str, str] | None:
    """``(experts module, parameter)`` of a stacked experts parameter's name, else None."""
    module, _, param = name.rpartition(".")
    return (module, param) if module.endswith(".experts") else None


def _shard_keys(model: nn.Module, name: str) -> set[str]:
    experts = _experts(name)
    if experts is not None:
        module, param = experts
        parts = list(model.get_submodule(module).shard_sizes()) if param in _FUSED_NAMES else [""]
        count = model.get_parameter(name).shape[0]
        return {f"{e}.{part}" if part else str(e) for e in range(count) for part in parts}
    layout = _shard_layout(model, name)
    return {""} if layout is None else set(layout)


def _shard_of(model: nn.Module, param: nn.Parameter, name: str, shard: str, key: str) -> torch.Tensor:
    """The slice of ``param`` that a checkpoint tensor of shard ``shard`` fills (all of it for "")."""
    target = param.data
    experts = _experts(name)
    if experts is not None and shard:
        expert, _, shard = shard.partition(".")
        if int(expert) >= target.shape[0]:
            raise ValueError(f"checkpoint tensor {key} names expert {expert}, but {name} holds {target.shape[0]}")
        target = target[int(expert)]
        layout = model.get_submodule(experts[0]).shard_sizes() if shard else None
    else:
        layout = _shard_layout(model, name) if shard else None
        if layout is not None and name.endswith(".weight_scale") and param.dim() == 2:   # a scale per block
            layer = name.removesuffix(".weight_scale")
            layout = _block_rows(layout, model.get_submodule(layer).block[0], layer)
    if shard:
        if layout is None or shard not in layout:
            raise ValueError(f"checkpoint tensor {key} does not fit parameter {name}")
        order = list(layout)
        offset = sum(layout[k] for k in order[: order.index(shard)])
        target = target.narrow(0, offset, layout[shard])
    return target


def _block_rows(layout: dict[str, int], bn: int, layer: str) -> dict[str, int]:
    """A fused layer's shard sizes in rows of its block scales: each shard must be whole blocks."""
    if any(rows % bn for rows in layout.values()):
        raise ValueError(f"{layer} fuses shards of {layout} rows, not each a whole number of {bn}-row blocks: "
                         "their block-wise FP8 scales cannot be fused")
    return {shard: rows // bn for shard, rows in layout.items()}


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
    more = len(names) - _MAX_NAMES_IN_ERROR
    return shown + (f" (and {more} more)" if more > 0 else "")
