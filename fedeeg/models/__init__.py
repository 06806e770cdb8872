"""Backbones (LaBraM and small baselines), their registry, and LoRA adapters.

Importing this package is cheap: peft is imported only when LoRA is applied,
braindecode only when a braindecode backbone is built.
"""

from __future__ import annotations

from .eeg_inception import EEGInception, build_eeg_inception
from .eegnet import EEGNet, FixedInputBackbone, build_eegnet
from .labram import BACKBONES, LaBraM, LaBraMConfig, build_backbone, load_checkpoint
from .lora import (
    LORA_PRESETS,
    MODULES_TO_SAVE,
    LoraSpec,
    apply_lora,
    check_lora_effective,
    count_parameters,
    load_trainable_state_dict,
    lora_pairs,
    trainable_state_dict,
)
from .registry import BACKBONE_REGISTRY, BackboneEntry, describe_backbones, load_backbone, load_weights

__all__ = [
    "BACKBONES",
    "BACKBONE_REGISTRY",
    "BackboneEntry",
    "EEGInception",
    "EEGNet",
    "FixedInputBackbone",
    "LaBraM",
    "LaBraMConfig",
    "build_backbone",
    "build_eeg_inception",
    "build_eegnet",
    "describe_backbones",
    "load_backbone",
    "load_checkpoint",
    "load_weights",
    "LORA_PRESETS",
    "MODULES_TO_SAVE",
    "LoraSpec",
    "apply_lora",
    "check_lora_effective",
    "count_parameters",
    "load_trainable_state_dict",
    "lora_pairs",
    "trainable_state_dict",
]
