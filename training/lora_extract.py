"""A LoRA adapter from a full fine-tune: the low-rank part of each linear layer's weight change.

Full fine-tuning can win on a tiny model (docs/TRAINING.md), but workers hot-swap *adapters*.
``extract_lora`` takes the difference ``W_tuned - W_base`` of every targeted linear layer, keeps
its top ``rank`` singular directions (``B @ A`` = the best rank-r approximation, SVD) and writes a
PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that vLLM's ``LoRARequest``
and transformers load. Changes outside the targeted layers (embeddings, norms) are not carried:
the returned report says how much of the change the adapter keeps, and the promotion gate
measures the adapter itself, not the full model it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def extract_lora(base_dir: str | Path, tuned_dir: str | Path, out_dir: str | Path, *, rank: int = 16,
                 targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, Any]:
    """Write the rank-``rank`` adapter of ``tuned_dir`` over ``base_dir`` into ``out_dir``; return a
    report (per-layer kept share of the change's energy, the untargeted parameters that changed)."""
    import torch
    from safetensors.torch import load_file, save_file

    base = _weights(Path(base_dir), load_file)
    tuned = _weights(Path(tuned_dir), load_file)
    pattern = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(%s))\.weight$" % "|".join(targets))
    tensors: dict[str, Any] = {}
    kept, untargeted = {}, []
    for name, w in tuned.items():
        b = base.get(name)
        if b is None:
            continue
        delta = (w.float() - b.float())
        if not torch.any(delta):
            continue
        m = pattern.match(name)
        if m is None:
            untargeted.append(name)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.shape[0])
        root = s[:r].sqrt()
        lora_a = (root[:, None] * vh[:r]).contiguous()          # [r, in]
        lora_b = (u[:, :r] * root[None, :]).contiguous()         # [out, r]
        prefix = f"base_model.model.{m.group(1)}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
        kept[m.group(1)] = round(float((s[:r] ** 2).sum() / (s ** 2).sum()), 4)
    if not tensors:
        raise ValueError(f"{tuned_dir}: no targeted linear layer differs from {base_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "target_modules": sorted({k.rsplit(".", 1)[-1] for k in kept}),
              "base_model_name_or_path": str(Path(base_dir).resolve()), "fan_in_fan_out": False,
              "inference_mode": True, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    report = {"rank": rank, "layers": len(kept), "mean_energy_kept": round(sum(kept.values()) / len(kept), 4),
              "min_energy_kept": min(kept.values()), "untargeted_changed": untargeted}
    (out / "extraction.json").write_text(json.dumps({**report, "per_layer": kept}, indent=2) + "\n")
    return report


def _weights(folder: Path, load_file: Any) -> dict[str, Any]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights")
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
