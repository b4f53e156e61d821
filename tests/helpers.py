"""Test helpers: build small PEFT LoRA adapters with non-zero weights on the real base model."""

from __future__ import annotations

from pathlib import Path


def make_random_adapter(base_path: str, out: Path, *, seed: int, rank: int = 8, scale: float = 0.05,
                        targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """Save a LoRA adapter whose A and B are random (B is zero after peft init; we fill it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(str(out))
    return out
