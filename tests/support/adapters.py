"""LoRA adapters for the worker, registry and retrain tests."""

from __future__ import annotations


def make_adapter(base, out, seed: int):
    """A PEFT LoRA adapter with random (non-zero) weights, saved as trainers save them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out
