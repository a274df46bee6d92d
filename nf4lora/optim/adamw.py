"""AdamW with float32 or blockwise 8-bit states, `torch.optim.Optimizer`-compatible, one fused launch per step.

Hyperparameters and their meaning are torch.optim.AdamW's (decoupled weight decay, bias correction); the states are
float32 for every parameter dtype. With `optim_bits=8` the moments are stored as bitsandbytes' blockwise 8-bit
states (256 elements per block, signed dynamic map for the first moment, unsigned for the second) and
dequantized into float32 inside the step; parameters with fewer than `min_8bit_size` elements keep float32 states,
as bitsandbytes does. The arithmetic and state formats are in `fused_adamw.py`, the kernel in `triton_adamw.py`.

State of a parameter p (`optimizer.state[p]`): `step` (int), the state tensors as flat views of one byte `buffer`
per parameter (`state_layout`; one buffer so that `PagedAdamW` moves a page with one copy), and the `segment` the
fused step reuses between steps.

`state_dict()` has torch's structure: {"state": {index: {...}}, "param_groups": [...]}; a state entry holds
`step` as a 0-d float32 tensor (as torch.optim.AdamW does) and
- 32-bit: `exp_avg`, `exp_avg_sq`, float32, the parameter's shape (torch.optim.AdamW's keys);
- 8-bit: `state1`, `state2` uint8 in the parameter's shape, `absmax1`, `absmax2` (ceil(numel/256),) float32.
The tensors are views of the live state, as torch's are (deep-copy to keep a snapshot; `PagedAdamW` returns CPU
copies). `load_state_dict` copies the tensors into the optimizer's own buffers, accepts torch.optim.AdamW's
32-bit dicts, and refuses a dict whose groups, parameter counts, state kinds or shapes differ from this
optimizer's (or that asks for amsgrad / maximize).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from nf4lora.optim.fused_adamw import QBLOCK, STATE_FIELDS_8, STATE_FIELDS_32, Segment, adamw_update, step_scalars

OPTIM_BITS = (8, 32)
_FIELD_ALIGN = 256  # bytes; every state field in a buffer starts aligned for wide loads
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=4096)
def state_layout(numel: int, eight_bit: bool) -> tuple[tuple[tuple[str, torch.dtype, int, int], ...], int]:
    """Where the state of `numel` elements lives in its byte buffer: ((name, dtype, count, byte offset), ...), nbytes.

    The absmax fields come first in 8-bit layouts so every float32 field stays 4-byte aligned.
    """
    if eight_bit:
        blocks = -(-numel // QBLOCK)
        fields = (("absmax1", torch.float32, blocks), ("absmax2", torch.float32, blocks),
                  ("state1", torch.uint8, numel), ("state2", torch.uint8, numel))
    else:
        fields = (("exp_avg", torch.float32, numel), ("exp_avg_sq", torch.float32, numel))
    layout, offset = [], 0
    for name, dtype, count in fields:
        layout.append((name, dtype, count, offset))
        offset += -(-count * dtype.itemsize // _FIELD_ALIGN) * _FIELD_ALIGN
    return tuple(layout), offset


def state_views(buffer: torch.Tensor, numel: int, eight_bit: bool) -> dict[str, torch.Tensor]:
    """Flat typed views of the state fields inside `buffer` ((>= nbytes,) uint8) for `numel` elements."""
    layout, _ = state_layout(numel, eight_bit)
    return {name: buffer[offset:offset + count * dtype.itemsize].view(dtype) for name, dtype, count, offset in layout}


_UNSUPPORTED = ("amsgrad", "maximize")  # torch.optim.AdamW options this AdamW does not implement


def _check_hyperparameters(group: dict) -> None:
    for option in _UNSUPPORTED:
        if group.get(option):
            raise ValueError(f"{option}=True is not supported by nf4lora's AdamW; valid: {option}=False")
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) or not lr >= 0.0:
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {tuple(betas)!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def _release_grads(segments: list[Segment]) -> None:
    """Drop the segments' gradient references, so that `zero_grad()` frees gradient memory between steps."""
    for segment in segments:
        segment.grad = None


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) with float32 or 8-bit states and a fused multi-tensor step.

    Args:
        params: parameters or param groups (float32/float16/bfloat16, contiguous).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight_decay defaults to 0.01 there and here).
        optim_bits: 32 (float32 states) or 8 (blockwise 8-bit states).
        min_8bit_size: parameters with fewer elements keep float32 states when optim_bits=8 (bitsandbytes: 4096).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, optim_bits: int = 32, min_8bit_size: int = 4096):
        if optim_bits not in OPTIM_BITS:
            raise ValueError(f"optim_bits must be one of {OPTIM_BITS}, got {optim_bits!r}")
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        for p in group["params"]:
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"AdamW parameters must be float32, float16 or bfloat16, got {p.dtype}")

    # -- state storage (PagedAdamW overrides these) ----------------------------------------------------------

    def eight_bit(self, p: torch.Tensor) -> bool:
        """Whether `p` gets 8-bit states."""
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        eight_bit = self.eight_bit(p)
        _, nbytes = state_layout(p.numel(), eight_bit)
        state["buffer"] = torch.zeros(nbytes, dtype=torch.uint8, device=p.device)
        state.update(state_views(state["buffer"], p.numel(), eight_bit))
        state["segment"] = Segment(p, None, 0, p.numel(), self._state_tensors(p, state))

    def _state_tensors(self, p: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
        """The flat state tensors of all of `p`'s elements, for `state_dict` (fields per `state_layout`)."""
        return {name: state[name] for name, *_ in state_layout(p.numel(), self.eight_bit(p))[0]}

    def _load_state_tensors(self, p: torch.Tensor, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self._init_state(p, state)
        for name, view in self._state_tensors(p, state).items():
            view.copy_(tensors[name].reshape(-1))

    def _clear_state(self) -> None:
        self.state.clear()

    def _update(self, work: list[tuple[torch.Tensor, torch.Tensor, dict, int]], scalars: list[list[float]]) -> None:
        """Update every (param, grad, state, scalar row) of `work`, all on one device."""
        segments = []
        for _, g, state, row in work:
            segment = state["segment"]
            segment.grad, segment.scalars = g, row
            segments.append(segment)
        adamw_update(segments, scalars)
        _release_grads(segments)

    # -- step ----------------------------------------------------------------------------------------------------

    def _params_with_grad(self) -> Iterator[tuple[dict, torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient; returns `closure()` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_device: dict[torch.device, list] = {}
        scalars: list[list[float]] = []
        rows: dict[tuple[int, int], int] = {}
        for group, p in self._params_with_grad():
            if p.grad.is_sparse:
                raise ValueError("AdamW does not support sparse gradients; use dense gradients")
            if not p.is_contiguous():
                raise ValueError(f"AdamW needs contiguous parameters, got shape {tuple(p.shape)} stride {p.stride()}")
            state = self.state[p]
            if not state:
                state["step"] = 0
                self._init_state(p, state)
            state["step"] += 1
            key = (id(group), state["step"])
            if key not in rows:
                rows[key] = len(scalars)
                beta1, beta2 = group["betas"]
                scalars.append(step_scalars(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                                            state["step"]))
            by_device.setdefault(p.device, []).append((p, p.grad.contiguous(), state, rows[key]))
        for work in by_device.values():
            self._update(work, scalars)
        return loss

    # -- checkpointing -------------------------------------------------------------------------------------------

    def _indexed_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """torch's layout: {"state": {index: entry}, "param_groups": [...]}; entries per the module docstring."""
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state = {}
        for index, p in enumerate(self._indexed_params()):
            if p in self.state and self.state[p]:
                entry = {"step": torch.tensor(float(self.state[p]["step"]))}
                for name, tensor in self._state_tensors(p, self.state[p]).items():
                    entry[name] = tensor if name.startswith("absmax") else tensor.view(p.shape)
                state[index] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and states from `state_dict()` output of an optimizer over the same parameters."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(saved['params'])} params in the state dict, "
                                 f"{len(group['params'])} here")
        params = self._indexed_params()
        index_of = {saved_index: i for i, saved_index in enumerate(
            index for saved in saved_groups for index in saved["params"])}
        incoming = {}
        for saved_index, entry in state_dict["state"].items():
            if saved_index not in index_of:
                raise ValueError(f"state dict has state for param {saved_index}, which no param group lists")
            p = params[index_of[saved_index]]
            incoming[p] = self._check_entry(index_of[saved_index], p, entry)
        merged = [{**group, **{k: v for k, v in saved.items() if k != "params"}}
                  for saved, group in zip(saved_groups, self.param_groups)]
        for group in merged:
            _check_hyperparameters(group)
        for group, new in zip(self.param_groups, merged):
            group.update(new)
        self._clear_state()
        for p, entry in incoming.items():
            state = self.state[p]
            state["step"] = int(entry["step"])
            self._load_state_tensors(p, state, entry)

    def _check_entry(self, index: int, p: torch.Tensor, entry: dict) -> dict:
        fields = STATE_FIELDS_8 if self.eight_bit(p) else STATE_FIELDS_32
        if set(entry) != {"step", *fields}:
            raise ValueError(f"state of param {index} has keys {sorted(entry)}; this optimizer "
                             f"({self.optim_bits}-bit, numel {p.numel()}) expects {sorted(('step', *fields))}")
        layout, _ = state_layout(p.numel(), self.eight_bit(p))
        for name, dtype, count, _ in layout:
            tensor = entry[name]
            if tensor.numel() != count or (name not in ("absmax1", "absmax2") and tensor.shape != p.shape):
                raise ValueError(f"state {name!r} of param {index} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(p.shape) if count == p.numel() else (count,)}")
            if tensor.dtype != dtype and not (dtype == torch.float32 and tensor.is_floating_point()):
                raise ValueError(f"state {name!r} of param {index} has dtype {tensor.dtype}, expected {dtype}")
        return entry
