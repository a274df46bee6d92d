"""`NF4Linear`: a frozen linear layer whose weight is a `QuantizedTensor` (bitsandbytes' `Linear4bit`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from nf4lora.kernels import dequantize, nf4_linear, nf4_linear_parts

from .blockwise import FLOAT_DTYPES
from .state_dict import bnb_state_keys, from_bnb_state_dict, to_bnb_state_dict
from .tensor import QuantizedTensor, quantize


class NF4Linear(nn.Module):
    """y = x @ dequantize(W).T + b, with W (out_features, in_features) stored in 4 bits.

    The weight is frozen and is not a Parameter; the bias, if any, is a Parameter (frozen by LoRA injection unless
    its bias mode trains it) held in the dtype it was given (the model's), so that saving it loses nothing. Inputs
    and the bias are cast to `compute_dtype` (default: the weight's original dtype) and the output is cast back to
    the input's dtype, as `Linear4bit` does (an fp32 model may compute in bf16). The state
    dict uses bitsandbytes' keys (`nf4/state_dict.py`), so checkpoints move both ways between nf4lora and
    transformers + bitsandbytes.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise TypeError(f"NF4Linear needs a QuantizedTensor weight, got {type(weight).__name__}; "
                            "use NF4Linear.from_linear to quantize an nn.Linear")
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype or weight.dtype
        if self.compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype {self.compute_dtype!r} is not supported; valid: float32, float16, bfloat16")
        if bias is not None:
            check_bias(bias, self.out_features)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize an `nn.Linear` (on its current device) into an `NF4Linear`."""
        weight = quantize(linear.weight.detach(), blocksize, quant_type, double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(weight, bias, compute_dtype or linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features), any floating dtype -> (..., out_features) in x's dtype."""
        return output_in_dtype(nf4_linear(in_compute_dtype(x, self.compute_dtype), self.weight, self.compute_bias()),
                               x.dtype)

    def compute_bias(self) -> torch.Tensor | None:
        """The bias as forward adds it: (out_features,) in ``compute_dtype``, differentiable to ``bias``; None without
        one. ``Linear4bit`` casts its bias so too."""
        return None if self.bias is None else self.bias.to(self.compute_dtype)

    @staticmethod
    def forward_group(layers: list[NF4Linear], x: torch.Tensor) -> list[torch.Tensor]:
        """``[layer(x) for layer in layers]`` for NF4Linear layers that read the same x (a decode step's q/k/v or
        gate/up): one kernel launch for all of them (``nf4_linear_parts``) when none has a bias or a hook and
        they share a compute dtype."""
        if not layers:
            return []
        dtype = layers[0].compute_dtype
        if any(layer.bias is not None or layer.compute_dtype != dtype or layer._forward_hooks
               or layer._forward_pre_hooks for layer in layers):
            return [layer(x) for layer in layers]
        parts = nf4_linear_parts(in_compute_dtype(x, dtype), [layer.weight for layer in layers])
        return [output_in_dtype(y, x.dtype) for y in parts]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out_features, in_features) dense weight in `dtype` (default `compute_dtype`)."""
        return dequantize(self.weight, dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the packed weight too; dtype casts leave it alone (it stays 4-bit)
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(to_bnb_state_dict(self.weight, prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = bnb_state_keys(state_dict, prefix + "weight")
        if not keys:
            missing_keys.append(prefix + "weight")
        else:
            weight = from_bnb_state_dict({k: state_dict[k] for k in keys}, prefix + "weight")
            if weight.shape != self.weight.shape:
                error_msgs.append(
                    f"size mismatch for {prefix}weight: checkpoint {tuple(weight.shape)}, model {tuple(self.weight.shape)}"
                )
            elif local_metadata.get("assign_to_params_buffers", False):
                self.weight = weight  # load_state_dict(assign=True) keeps the checkpoint's tensors, as for parameters
            else:
                self.weight = weight.to(self.weight.device)
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        state = self.weight.state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{state.quant_type}{'+dq' if state.double_quant else ''}, blocksize={state.blocksize}, "
            f"compute_dtype={self.compute_dtype}"
        )


def quantize_linears(module: nn.Module, skip: str | tuple[str, ...] = ("lm_head",), **options) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` inside ``module`` whose attribute name is not in ``skip`` (a name or a
    collection of names) by ``NF4Linear.from_linear(linear, **options)`` (quantized on its current device); return
    ``module``, or for a bare ``nn.Linear``, which has no parent to be replaced in, its ``NF4Linear``.

    A linear shared by several parents becomes one ``NF4Linear`` shared by them. ``nn.MultiheadAttention``'s
    ``out_proj`` (a ``NonDynamicallyQuantizableLinear``) stays dense: its parent reads ``out_proj.weight`` directly.

    For a model built in memory; ``nf4lora.model.load_model(..., quantization="nf4")`` quantizes a checkpoint as it
    reads it instead.
    """
    if is_quantizable_linear(module):
        return NF4Linear.from_linear(module, **options)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)  # `name in "lm_head"` would match "head" too
    quantized: dict[nn.Linear, NF4Linear] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_quantizable_linear(child) and name not in skip:
                if child not in quantized:
                    quantized[child] = NF4Linear.from_linear(child, **options)
                setattr(parent, name, quantized[child])
    return module


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` without gradients holding ``weight`` (out, in) and ``bias`` (out,) or None, in weight's
    dtype and on its device: what a merge or a dequantization leaves in a 4-bit layer's place."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def is_quantizable_linear(module: nn.Module) -> bool:
    """Whether ``quantize_linears`` replaces ``module``: an ``nn.Linear``, but not one torch marks as not to be
    swapped by quantizers (``NonDynamicallyQuantizableLinear``)."""
    return isinstance(module, nn.Linear) and not isinstance(module, NonDynamicallyQuantizableLinear)


def in_compute_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A layer's input ``x`` (..., in_features) cast to its compute ``dtype``; refused unless a floating-point
    tensor: an integer input cast there, and its output cast back, came out as truncated integers where
    ``nn.Linear`` raises."""
    if isinstance(x, torch.Tensor) and x.dtype == dtype:
        return x
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"NF4Linear input must be a floating-point tensor, got {got}; valid: float32, float16, "
                        "bfloat16 (cast to compute_dtype) or float64")
    return x.to(dtype)


def check_bias(bias: torch.Tensor, out_features: int) -> None:
    """Refuse a bias that is not an (out_features,) floating-point tensor."""
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"bias has dtype {bias.dtype}; valid: a floating-point dtype (cast to compute_dtype)")
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def output_in_dtype(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A layer's output ``y`` cast back to its input's ``dtype``, as ``Linear4bit`` gives it; the common case (compute
    dtype = input dtype) skips even a no-op ``to`` call."""
    return y if y.dtype == dtype else y.to(dtype)
