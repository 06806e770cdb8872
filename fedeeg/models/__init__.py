"""Backbones (LaBraM) and LoRA adapters.

Importing this package is cheap: peft is imported only when LoRA is applied.
"""

from __future__ import annotations

from .labram import BACKBONES, LaBraM, LaBraMConfig, build_backbone, load_checkpoint
from .lora import (
    LORA_PRESETS,
    MODULES_TO_SAVE,
    LoraSpec,
    apply_lora,
    count_parameters,
    load_trainable_state_dict,
    lora_pairs,
    trainable_state_dict,
)

__all__ = [
    "BACKBONES",
    "LaBraM",
    "LaBraMConfig",
    "build_backbone",
    "load_checkpoint",
    "LORA_PRESETS",
    "MODULES_TO_SAVE",
    "LoraSpec",
    "apply_lora",
    "count_parameters",
    "load_trainable_state_dict",
    "lora_pairs",
    "trainable_state_dict",
]
