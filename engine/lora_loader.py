"""Reading LoRA adapters in PEFT's format and checking them against the base model.

An adapter is a directory with ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, optionally ``use_rslora``) and ``adapter_model.safetensors``, whose
tensors are named ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight``
(``[r, in]``) and ``...lora_B.weight`` (``[out, r]``). A projection's output gains
``scale * (x @ A^T) @ B^T`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA), as PEFT computes it. A model whose checkpoint fuses q/k/v or gate/up (Phi-3) is
adapted on ``qkv_proj`` or ``gate_up_proj``: one A, and B's rows split among the projections
they stack, so each is adapted as the fused one was.

Every check runs when an adapter loads (at start, or at runtime: ``EngineCore.load_lora``) and
its error names the adapter and what is wrong: a target
module other than the seven projections (``SUPPORTED_MODULES``) or the two fused ones, a rank above
``max_lora_rank``, a tensor of the wrong shape or name, PEFT features that change the
math (DoRA, per-module ranks, trained biases, ``modules_to_save``). (``EngineConfig`` refuses
more adapters than ``max_loras``; ``ModelRunner.add_lora`` those loaded at runtime.) No torch device
work here: tensors are read to the CPU as float32.

An adapter's ``digest`` identifies its weights: the BLAKE2b digest (8 bytes, as 16 hex chars) of
its two files' bytes, each preceded by its length (8 bytes, unsigned little endian), config first.
Two loads under one name are the same adapter exactly when their digests are equal.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from baton.engine.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "qkv_proj": "self_attn", "gate_up_proj": "mlp"}
# The decoder's layers as PEFT names them: ``model.layers``, or in an image-text model (Gemma 3's)
# ``language_model.model.layers`` (transformers 4) or ``model.language_model.layers`` (5).
_KEY = re.compile(r"base_model\.model\.(?:model|language_model\.model|model\.language_model)\.layers\.(\d+)\.(\w+)\.(\w+)"
                  r"\.lora_([AB])\.weight")


@dataclass
class LoRAAdapter:
    """One adapter as read from disk: ``weights[(layer, proj)] = (A [r, in], B [out, r])``,
    float32 on the CPU, for each projection it adapts; ``digest`` identifies its files (module docs)."""

    name: str
    path: Path
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    digest: str


def projection_shape(config: ModelConfig, proj: str) -> tuple[int, int]:
    """``(out, in)`` of a checkpoint projection of ``config``'s model."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
            "qkv_proj": (q + 2 * kv, hidden), "gate_up_proj": (2 * inter, hidden)}[proj]


def load_adapters(modules: dict[str, str], config: ModelConfig, max_rank: int) -> list[LoRAAdapter]:
    """Every adapter of ``modules`` (name -> directory), checked against ``config``'s model."""
    return [load_adapter(name, path, config, max_rank) for name, path in modules.items()]


def load_adapter(name: str, path: str | Path, config: ModelConfig, max_rank: int) -> LoRAAdapter:
    directory = Path(path).expanduser()
    where = f"LoRA adapter {name!r} ({directory})"
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{where}: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    peft = json.loads((directory / CONFIG_FILE).read_text())
    rank, scale = _check_config(peft, where, max_rank)
    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        for key in f.keys():
            layer, proj, kind = _parse_key(key, config, where)
            weights.setdefault((layer, proj), {})[kind] = f.get_tensor(key).float()
    if not weights:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    pairs = {}
    for (layer, proj), ab in sorted(weights.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: layer {layer} {proj} has lora_{''.join(ab)} but not both lora_A and lora_B")
        out, inp = projection_shape(config, proj)
        for kind, want in (("A", (rank, inp)), ("B", (out, rank))):
            if tuple(ab[kind].shape) != want:
                raise ValueError(f"{where}: layer {layer} {proj}.lora_{kind} has shape {tuple(ab[kind].shape)}, "
                                 f"expected {want} (r={rank} and the base model's {proj})")
        parts = FUSED_MODULES.get(proj, (proj,))
        rows = ab["B"].split([projection_shape(config, part)[0] for part in parts])
        for part, b in zip(parts, rows):
            if (layer, part) in pairs:
                raise ValueError(f"{where}: layer {layer} adapts {part} both alone and within a fused projection")
            # Granite's output and down projections carry its residual multiplier (``fold_scales``):
            # so must their deltas.
            scale_b = config.residual_multiplier if part in ("o_proj", "down_proj") else 1.0
            pairs[(layer, part)] = (ab["A"], b * scale_b if scale_b != 1.0 else b.contiguous())
    return LoRAAdapter(name, directory, rank, scale, pairs, adapter_digest(directory))


def adapter_digest(directory: Path) -> str:
    """The digest of an adapter directory's two files (see module docs)."""
    digest = hashlib.blake2b(digest_size=8)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = directory / name
        digest.update(struct.pack("<Q", path.stat().st_size))
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _check_config(peft: dict, where: str, max_rank: int) -> tuple[int, float]:
    """The adapter's rank and scale, once its config asks for nothing Baton cannot compute."""
    rank, alpha = peft.get("r"), peft.get("lora_alpha", peft.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} is above max_lora_rank={max_rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    targets = peft.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unsupported = [t for t in targets if t not in SUPPORTED_MODULES and t not in FUSED_MODULES]
    if unsupported:
        raise ValueError(f"{where}: target module(s) {', '.join(map(str, unsupported))} not supported "
                         f"(supported: {', '.join([*SUPPORTED_MODULES, *FUSED_MODULES])})")
    refused = [field for field in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if peft.get(field)]
    if peft.get("bias", "none") != "none":
        refused.append(f"bias={peft['bias']!r}")
    if refused:
        raise ValueError(f"{where}: {', '.join(refused)} not supported")
    scale = alpha / math.sqrt(rank) if peft.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _parse_key(key: str, config: ModelConfig, where: str) -> tuple[int, str, str]:
    """``(layer, proj, "A" | "B")`` of a tensor name; ValueError naming a tensor Baton cannot apply."""
    match = _KEY.fullmatch(key)
    if match is None or match[3] not in _PARENT or _PARENT[match[3]] != match[2]:
        raise ValueError(f"{where}: tensor {key} is not a LoRA weight of a supported module "
                         f"({', '.join([*SUPPORTED_MODULES, *FUSED_MODULES])})")
    layer = int(match[1])
    if layer >= config.num_layers:
        raise ValueError(f"{where}: tensor {key} names layer {layer}, but the base model has {config.num_layers}")
    if match[2] == "mlp" and config.moe is not None and config.moe.sparse_layers[layer]:
        raise ValueError(f"{where}: tensor {key} adapts layer {layer}'s MLP, a mixture of experts: "
                         f"LoRA on experts is not supported")
    return layer, match[3], match[4]
