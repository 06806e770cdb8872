"""FedEEG: federated LoRA adaptation of EEG foundation models across hospitals."""

__version__ = "0.1.0"

__all__ = ["__version__"]
