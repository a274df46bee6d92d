"""Triton kernels for NF4/FP4 weights and the autograd ``nf4_linear`` built on them.

Public names (see docs/ARCHITECTURE.md): ``nf4_linear``, ``nf4_linear_parts``, ``dequantize``, ``quantize``,
``use_kernels``, ``kernel_mode``. Set ``NF4LORA_KERNELS=auto|triton|reference`` or use
``with use_kernels("reference"):`` to force a path; ``dispatch.py`` documents the modes.
"""

from nf4lora.kernels.dispatch import kernel_mode, use_kernels
from nf4lora.kernels.linear import dequantize, nf4_linear, nf4_linear_parts, quantize

__all__ = ["dequantize", "kernel_mode", "nf4_linear", "nf4_linear_parts", "quantize", "use_kernels"]
