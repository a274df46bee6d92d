"""Optimizers: `AdamW` and `PagedAdamW` with float32 or blockwise 8-bit states (docs/ARCHITECTURE.md)."""

from nf4lora.optim.adamw import AdamW
from nf4lora.optim.paged_adamw import PagedAdamW

__all__ = ["AdamW", "PagedAdamW"]
