"""Random LoRA adapters in PEFT's format for the demo checkpoint, and the reference they are
checked against: the checkpoint with the adapter merged into its weights (W + scale * B @ A),
written as a full model beside the demo's config and tokenizer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from baton.engine.loader import weight_files
from baton.engine.lora_loader import SUPPORTED_MODULES, projection_shape
from baton.engine.model_config import load_model_config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


def _key(layer: int, proj: str, kind: str) -> str:
    parent = "self_attn" if proj in ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{parent}.{proj}.lora_{kind}.weight"


def make_adapter(
    demo_model: str, directory: Path, *, rank: int = 8, alpha: float = 16, targets: tuple[str, ...] = SUPPORTED_MODULES,
    use_rslora: bool = False, seed: int = 0, std: float = 0.1, layers: range | None = None,
) -> Path:
    """A PEFT adapter with random, non-zero A and B (PEFT starts B at zero, which changes nothing)."""
    config = load_model_config(Path(demo_model))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers if layers is not None else range(config.num_layers):
        for proj in targets:
            out, inp = projection_shape(config, proj)
            tensors[_key(layer, proj, "A")] = torch.randn(rank, inp, generator=generator) * std
            tensors[_key(layer, proj, "B")] = torch.randn(out, rank, generator=generator) * std
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    peft = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
            "use_rslora": use_rslora, "bias": "none", "base_model_name_or_path": demo_model}
    (directory / "adapter_config.json").write_text(json.dumps(peft))
    return directory


def merge_adapter(demo_model: str, adapter: Path, directory: Path) -> Path:
    """The demo checkpoint with ``adapter`` merged in, as one ``model.safetensors`` in ``directory``."""
    peft = json.loads((adapter / "adapter_config.json").read_text())
    rank = peft["r"]
    scale = peft["lora_alpha"] / (math.sqrt(rank) if peft.get("use_rslora") else rank)
    weights = {}
    for path in weight_files(Path(demo_model)):
        with safe_open(str(path), framework="pt") as f:
            weights.update({key: f.get_tensor(key) for key in f.keys()})
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." in key:
                target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                lora_a, lora_b = f.get_tensor(key), f.get_tensor(key.replace(".lora_A.", ".lora_B."))
                weights[target] = weights[target] + scale * (lora_b.double() @ lora_a.double()).to(weights[target].dtype)
    directory.mkdir(parents=True, exist_ok=True)
    for path in Path(demo_model).iterdir():
        if not path.name.startswith("model"):
            shutil.copy(path, directory / path.name)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
