"""Fills a model's parameters from Hugging Face safetensors (sharded or not) or with seeded random values."""

from __future__ import annotations

import glob
import json
import os

import torch
from torch import nn


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's *.safetensors files: those the index names, else every one in the directory."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(model_dir, name) for name in weight_map.values()})
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {model_dir}; use load_format='dummy' for random weights"
        )
    return files


def load_safetensors(model: nn.Module, model_dir: str) -> None:
    """Copy every checkpoint tensor into its (possibly fused, possibly sharded) parameter.

    Raises ValueError naming unknown checkpoint tensors or parameters left unloaded.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    loaded: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name:
                    continue
                if tied and name == "lm_head.weight":
                    continue  # shares embed_tokens.weight
                tensor = f.get_tensor(name)
                target, shard_id = name, None
                for ckpt_part, (our_part, shard) in packed.items():
                    if f".{ckpt_part}." in name:
                        target, shard_id = name.replace(f".{ckpt_part}.", f".{our_part}."), shard
                        break
                param = params.get(target)
                if param is None:
                    raise ValueError(
                        f"checkpoint tensor {name!r} in {path} matches no model parameter"
                    )
                loader = getattr(param, "weight_loader", None)
                with torch.no_grad():
                    if shard_id is not None:
                        loader(param, tensor.to(param.dtype), shard_id)
                    elif loader is not None:
                        loader(param, tensor.to(param.dtype))
                    else:
                        if param.shape != tensor.shape:
                            raise ValueError(
                                f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}"
                            )
                        param.data.copy_(tensor)
                loaded.add(target)
    unloaded = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if unloaded:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for {unloaded[:8]}")


def init_dummy(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random weights (norm weights 1) on the parameters' own device; same seed, same model."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def init_dummy_sharded(
    model: nn.Module, full_model: nn.Module, seed: int, std: float = 0.02
) -> None:
    """This tensor-parallel rank's slice of exactly the weights init_dummy gives the unsharded model.

    full_model: the tp_size=1 model (on the meta device: only names, shapes and order are read). Each
    full tensor is drawn in init_dummy's order, then handed to the parameter's weight_loader.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    config = model.config
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    with torch.no_grad():
        for name, full_param in full_model.named_parameters():
            param = params[name]
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            full = torch.empty(full_param.shape, dtype=param.dtype, device=device)
            full.normal_(0.0, std, generator=generator)
            if name.endswith("qkv_proj.weight"):
                for shard, part in zip("qkv", full.split([q_rows, kv_rows, kv_rows]), strict=True):
                    param.weight_loader(param, part, shard)
            elif name.endswith("gate_up_proj.weight"):
                for shard, part in enumerate(full.chunk(2)):
                    param.weight_loader(param, part, shard)
            elif hasattr(param, "weight_loader"):
                param.weight_loader(param, full)
            else:
                param.copy_(full)
