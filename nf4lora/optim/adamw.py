"""AdamW with float32 or blockwise 8-bit states, `torch.optim.Optimizer`-compatible, one fused launch per step.

Hyperparameters and their meaning are torch.optim.AdamW's (decoupled weight decay, bias correction); the states are
float32 for every parameter dtype. With `optim_bits=8` the moments are stored as bitsandbytes' blockwise 8-bit
states (256 elements per block, signed dynamic map for the first moment, unsigned for the second) and
dequantized into float32 inside the step; parameters with fewer than `min_8bit_size` elements keep float32 states,
as bitsandbytes does. The arithmetic and state formats are in `fused_adamw.py`, the kernel in `triton_adamw.py`.

State of a parameter p (`optimizer.state[p]`): `step` (int), the state tensors as flat views of one byte `buffer`
per parameter (`state_layout`; one buffer so that `PagedAdamW` moves a page with one copy), and the `segment` the
fused step reuses between steps.

Note: the step plan. A step's host work is a few Python operations per parameter, because everything that depends
only on which parameters have gradients and where their states live is kept in a `_StepPlan` (the segments, the
kernel's device tables, the scalar rows) and reused while it holds. Each step compares the parameters' and the
gradients' `data_ptr()`s with the plan's: equal, the plan runs as is (per-group scalars are recomputed every
step, so scheduler changes to lr count at once); a gradient at a new address (autograd reallocates them after
`zero_grad(set_to_none=True)`) is checked (contiguous) and only the gradient addresses are uploaded again;
anything else (a parameter gains or loses its gradient, is moved or replaced, groups change) builds a new plan.
`load_state_dict`, `add_param_group` and PagedAdamW's page moves drop the plan. The optimizer's state must change
only through these methods.

`state_dict()` has torch's structure: {"state": {index: {...}}, "param_groups": [...]}; a state entry holds
`step` as a 0-d float32 tensor (as torch.optim.AdamW does) and
- 32-bit: `exp_avg`, `exp_avg_sq`, float32, the parameter's shape (torch.optim.AdamW's keys);
- 8-bit: `state1`, `state2` uint8 in the parameter's shape, `absmax1`, `absmax2` (ceil(numel/256),) float32.
The tensors are views of the live state, as torch's are (deep-copy to keep a snapshot; `PagedAdamW` returns CPU
copies), except `absmax1` and `absmax2`, copies so that `torch.save` takes the dict. `load_state_dict` copies the
tensors into the optimizer's own buffers, accepts torch.optim.AdamW's 32-bit dicts, and refuses a dict whose
structure, groups, parameter counts, state kinds or shapes differ from this optimizer's (or that asks for amsgrad,
maximize, or torch.optim.Adam's L2 weight decay). Both run torch's state-dict hooks. `copy.deepcopy`, pickle and
`torch.save` of the optimizer object give a working optimizer that continues bit for bit.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections import defaultdict
from dataclasses import dataclass

import torch

from nf4lora.optim.fused_adamw import (QBLOCK, STATE_FIELDS_8, STATE_FIELDS_32, PreparedUpdate, Segment,
                                      step_scalars)

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


# what a parameter's state holds besides its step and byte buffer, all derived from the buffer
_BUFFER_VIEWS = ("segment", *STATE_FIELDS_32, *STATE_FIELDS_8)
_UNSUPPORTED = ("amsgrad", "maximize")  # torch.optim.AdamW options this AdamW does not implement


def _is_float(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(name: str, value, valid: str, minimum: int, allow_none: bool = False) -> None:
    """One-line TypeError / ValueError "`name` must be `valid`, got `value`" unless `value` is an int >= `minimum`
    (or None where `allow_none`)."""
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def _check_float(name: str, value, valid: str, in_range) -> None:
    """One-line TypeError / ValueError naming `name`, `value` and `valid` unless `value` is a float `in_range`."""
    if not _is_float(value):
        raise TypeError(f"{name} must be a float {valid}, got {value!r}")
    if not (math.isfinite(value) and in_range(value)):
        raise ValueError(f"{name} must be a float {valid}, got {value!r}")


def _check_hyperparameters(group: dict) -> None:
    for option in _UNSUPPORTED:
        if group.get(option):
            raise ValueError(f"{option}=True is not supported by nf4lora's AdamW; valid: {option}=False")
    # torch.optim.Adam's groups (and so its state dicts) say decoupled_weight_decay=False: L2 regularisation
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        raise ValueError(f"decoupled_weight_decay=False (Adam's L2 weight decay, weight_decay="
                         f"{group['weight_decay']!r}) is not supported by nf4lora's AdamW; valid: "
                         f"decoupled_weight_decay=True, or weight_decay=0")
    _check_float("lr", group["lr"], ">= 0", lambda lr: lr >= 0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_is_float, betas))):
        raise TypeError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {tuple(betas)!r}")
    # eps = 0 divides 0 by 0 wherever a gradient has been zero so far (LoRA's A at its first step)
    _check_float("eps", group["eps"], "> 0", lambda eps: eps > 0.0)
    _check_float("weight_decay", group["weight_decay"], ">= 0", lambda weight_decay: weight_decay >= 0.0)


def _check_params_listed(param_group, groups: list[dict]) -> None:
    """One-line errors for a param group that torch's `add_param_group` would take badly: without 'params' (a
    KeyError there), or listing a parameter twice or one that `groups` list already (torch only warns for the
    first, and this AdamW would update such a parameter twice per step with one step count). Lists a generator of
    parameters in `param_group`, as torch does."""
    if not isinstance(param_group, dict):
        return  # torch's own one-line TypeError
    if "params" not in param_group:
        raise ValueError(f"param group has keys {sorted(param_group)}; expected 'params' (a parameter or a list of "
                         f"parameters) among them")
    params = param_group["params"]
    if isinstance(params, (torch.Tensor, set)):
        return  # one tensor; a set gets torch's TypeError
    try:
        params = param_group["params"] = list(params)
    except TypeError:
        raise TypeError(f"param group 'params' must be a parameter or a list of parameters, got "
                        f"{type(params).__name__}") from None
    listed = {id(p): (g, i) for g, group in enumerate(groups) for i, p in enumerate(group["params"])}
    for i, p in enumerate(params):
        p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # torch's (name, parameter) pairs
        first = listed.setdefault(id(p), (len(groups), i))
        if first != (len(groups), i):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"param {i} of param group {len(groups)} (shape {shape}) is already param {first[1]} "
                             f"of param group {first[0]}; each parameter may be listed once")


def _check_structure(state_dict) -> None:
    """One-line errors for a state dict without torch's {"state": {...}, "param_groups": [{"params": [...]}]}."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state dict must be a dict with 'state' and 'param_groups', got {type(state_dict).__name__}")
    if not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"state dict has keys {sorted(state_dict)}; expected ['param_groups', 'state']")
    if not isinstance(state_dict["state"], dict) or not isinstance(state_dict["param_groups"], (list, tuple)):
        raise TypeError(f"state dict must map 'state' to a dict and 'param_groups' to a list, got "
                        f"{type(state_dict['state']).__name__} and {type(state_dict['param_groups']).__name__}")
    for i, group in enumerate(state_dict["param_groups"]):
        if not (isinstance(group, dict) and isinstance(group.get("params"), (list, tuple))):
            got = f"keys {sorted(group)}" if isinstance(group, dict) else type(group).__name__
            raise TypeError(f"param group {i} of the state dict must be a dict with 'params' (a list of indices), "
                            f"got {got}")


def _check_saved_step(index: int, step) -> None:
    """One-line TypeError / ValueError unless `step` (a number or a one-element tensor) is a whole number >= 0."""
    value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_meta else step
    if not _is_float(value):
        raise TypeError(f"state of param {index} has step {step!r}; expected a whole number >= 0")
    if not (value >= 0 and float(value).is_integer()):
        raise ValueError(f"state of param {index} has step {value!r}; expected a whole number >= 0")


def _check_saved_indices(saved_groups: list[dict]) -> None:
    """One-line ValueError where the state dict's groups list a param index twice: states would go to the wrong
    parameters."""
    listed = set()
    for i, saved in enumerate(saved_groups):
        for index in saved["params"]:
            if index in listed:
                raise ValueError(f"param group {i} of the state dict lists param {index!r} again; each index may be "
                                 f"listed once")
            listed.add(index)


def _hook_result(result, state_dict: dict) -> dict:
    """The state dict a torch state-dict hook hands on: the one it returned, or `state_dict` when it returned None."""
    return state_dict if result is None else result


@dataclass
class DevicePlan:
    """The part of a step on one device: the fused update of the resident segments, and (PagedAdamW) the pages
    that stream through the device as (page, gradient index, scalar row), with what the optimizer prepared to
    stream them (`stream`, built at its first step)."""

    device: torch.device
    update: PreparedUpdate
    paged_out: list[tuple]
    stream: object = None


@dataclass
class _StepPlan:
    """What a step reuses while the parameters, their gradients' presence and their states are unchanged.

    param_ptrs, grad_key: the `data_ptr()`s of every parameter and of its gradient (None without one, -1 where the
    gradient was not contiguous, so that it is checked again next step); absent: the parameters without gradient;
    states: the stepped parameters' states; rows: (group, state of a parameter in the row) per scalar row, the
    parameters of a row sharing their step.
    """

    param_ptrs: list[int]
    grad_key: list[int | None]
    absent: list[int]
    states: list[dict]
    rows: list[tuple[dict, dict]]
    devices: list[DevicePlan]


def _grad_ptrs(grads: list[torch.Tensor | None]) -> list[int | None] | None:
    """The gradients' `data_ptr()`s (None for no gradient), or None when one has no storage (a sparse gradient)."""
    try:
        try:
            return list(map(torch.Tensor.data_ptr, grads))
        except TypeError:  # a parameter without gradient
            return [None if g is None else g.data_ptr() for g in grads]
    except RuntimeError:
        return None


def _absent(grad_ptrs: list[int | None]) -> list[int]:
    """Indices of the parameters without gradient."""
    return [i for i, ptr in enumerate(grad_ptrs) if ptr is None] if None in grad_ptrs else []


def _contiguous(grads: list, grad_ptrs: list) -> list[int | None]:
    """Swap non-contiguous gradients for contiguous copies (this step's, in `grads` and `grad_ptrs`); returns the
    plan's gradient key: `grad_ptrs` as they came, -1 where a copy was made."""
    present = [g for g in grads if g is not None] if None in grad_ptrs else grads
    if all(map(torch.Tensor.is_contiguous, present)):
        return grad_ptrs
    key = list(grad_ptrs)
    for i, g in enumerate(grads):
        if g is not None and not g.is_contiguous():
            grads[i] = g.contiguous()
            grad_ptrs[i] = grads[i].data_ptr()
            key[i] = -1
    return key


def _check_state_matches(index: int, p: torch.Tensor, resident: list[Segment], streamed: list) -> None:
    """One-line ValueError where parameter `index` was resized or moved to another device under its state: the
    update would run over the old number of elements, or hand the kernel another device's addresses."""
    covered = sum(part.numel for part in resident + streamed)
    if covered != p.numel():
        raise ValueError(f"param {index} has {p.numel()} elements, its optimizer state {covered}; resizing a "
                         f"parameter needs a new optimizer (or a state dict of the new size)")
    elsewhere = {tensor.device for segment in resident for tensor in segment.state.values()} - {p.device}
    if elsewhere:
        raise ValueError(f"param {index} is on {p.device}, its optimizer state on {elsewhere.pop()}; move "
                         f"parameters before building the optimizer (or load a state dict after moving them)")


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) with float32 or 8-bit states and a fused multi-tensor step.

    Args:
        params: parameters or param groups (float32/float16/bfloat16, contiguous).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight_decay defaults to 0.01 there and here), finite
            floats; eps > 0 (torch also takes 0, which makes NaN of any element whose gradients were all zero).
        optim_bits: 32 (float32 states) or 8 (blockwise 8-bit states).
        min_8bit_size: parameters with fewer elements keep float32 states when optim_bits=8 (bitsandbytes: 4096).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, optim_bits: int = 32, min_8bit_size: int = 4096):
        if optim_bits not in OPTIM_BITS:
            raise ValueError(f"optim_bits must be one of {OPTIM_BITS}, got {optim_bits!r}")
        check_count("min_8bit_size", min_8bit_size, "an int >= 0", 0)
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self._plan: _StepPlan | None = None
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def __getstate__(self) -> dict:
        """torch's pickled state (defaults, state, param groups) plus this optimizer's settings, so that
        `copy.deepcopy`, pickle and `torch.save` give a working optimizer. A parameter's state goes without the typed
        views of its byte buffer and its segment (torch.save refuses one storage viewed as two dtypes), which
        `__setstate__` rebuilds; the step plan is rebuilt at the next step."""
        state = defaultdict(dict, {p: {k: v for k, v in entry.items() if k not in _BUFFER_VIEWS}
                                   for p, entry in self.state.items()})
        return {**super().__getstate__(), "state": state, "optim_bits": self.optim_bits,
                "min_8bit_size": self.min_8bit_size}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plan = None
        for p, entry in self.state.items():
            if "buffer" in entry:
                self._attach_buffer(p, entry, entry["buffer"])

    def add_param_group(self, param_group: dict) -> None:
        """torch's `add_param_group`, refusing (and not adding) a group with bad hyperparameters or dtypes, without
        'params', or listing a parameter that is listed already."""
        _check_params_listed(param_group, self.param_groups)
        super().add_param_group(param_group)
        self._plan = None
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            for p in group["params"]:
                if p.dtype not in _PARAM_DTYPES:
                    raise TypeError(f"AdamW parameters must be float32, float16 or bfloat16, got {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # -- state storage (PagedAdamW overrides these) ----------------------------------------------------------

    def eight_bit(self, p: torch.Tensor) -> bool:
        """Whether `p` gets 8-bit states."""
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        _, nbytes = state_layout(p.numel(), self.eight_bit(p))
        self._attach_buffer(p, state, torch.zeros(nbytes, dtype=torch.uint8, device=p.device))

    def _attach_buffer(self, p: torch.Tensor, state: dict, buffer: torch.Tensor) -> None:
        """Make `buffer` ((nbytes,) uint8, `state_layout`) hold `p`'s state: its field views and segment."""
        state["buffer"] = buffer
        state.update(state_views(buffer, p.numel(), self.eight_bit(p)))
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

    def _split(self, p: torch.Tensor, state: dict) -> tuple[list[Segment], list]:
        """`p`'s segments that the fused launch updates in place, and its pages that stream (AdamW: none)."""
        return [state["segment"]], []

    def _reserve(self, plan: DevicePlan) -> None:
        """Allocate what one device's part of the step needs, before any update (AdamW: nothing)."""

    def _update(self, plan: DevicePlan, grads: list, grad_ptrs: list, scalars: list[list[float]]) -> None:
        """Run one device's part of the step (grads and grad_ptrs indexed as `_indexed_params()`)."""
        plan.update.run(grads, grad_ptrs, scalars)

    # -- step ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient; returns `closure()` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._indexed_params()
        grads = [p.grad for p in params]
        grad_ptrs = _grad_ptrs(grads)
        plan = self._plan
        if plan is None or not self._follow(plan, params, grads, grad_ptrs):
            plan = self._plan = self._build_plan(params, grads, grad_ptrs)
        scalars = [step_scalars(float(group["lr"]), *group["betas"], group["eps"], group["weight_decay"],
                                state["step"] + 1) for group, state in plan.rows]
        # a step that fails (out of memory) before its updates leaves parameters and step counts as they were,
        # so that it can be retried
        for device_plan in plan.devices:
            self._reserve(device_plan)
        for device_plan in plan.devices:
            self._update(device_plan, grads, grad_ptrs, scalars)
        for state in plan.states:
            state["step"] += 1
        return loss

    @staticmethod
    def _follow(plan: _StepPlan, params: list[torch.Tensor], grads: list, grad_ptrs: list | None) -> bool:
        """Whether `plan` serves this step, following gradients that moved; False when a new plan is needed."""
        if grad_ptrs is None or list(map(torch.Tensor.data_ptr, params)) != plan.param_ptrs:
            return False
        if grad_ptrs != plan.grad_key:
            if _absent(grad_ptrs) != plan.absent:
                return False
            plan.grad_key = _contiguous(grads, grad_ptrs)
        return True

    def _build_plan(self, params: list[torch.Tensor], grads: list, grad_ptrs: list | None) -> _StepPlan:
        """Check every parameter with a gradient, create missing states, and lay out the fused update."""
        owners = [group for group in self.param_groups for _ in group["params"]]
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is not None and g.is_sparse:
                raise ValueError(f"param {i} (shape {tuple(p.shape)}) has a sparse gradient; AdamW does not support "
                                 f"sparse gradients, valid: dense ones")
            if g is not None and not p.is_contiguous():
                raise ValueError(f"AdamW needs contiguous parameters, got shape {tuple(p.shape)} stride {p.stride()}")
        grad_key = _contiguous(grads, grad_ptrs)
        states, rows, row_of, by_device = [], [], {}, {}
        for i, (group, p, g) in enumerate(zip(owners, params, grads)):
            if g is None:
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, state)
                state["step"] = 0  # after the allocation, which may fail: an empty state is created again
            states.append(state)
            key = (id(group), state["step"])
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append((group, state))
            segments, grad_index, paged_out = by_device.setdefault(p.device, ([], [], []))
            resident, streamed = self._split(p, state)
            _check_state_matches(i, p, resident, streamed)
            for segment in resident:
                segment.scalars = row_of[key]
            segments += resident
            grad_index += [i] * len(resident)
            paged_out += [(page, i, row_of[key]) for page in streamed]
        devices = [DevicePlan(device, PreparedUpdate(segments, grad_index), paged_out)
                   for device, (segments, grad_index, paged_out) in by_device.items()]
        return _StepPlan([p.data_ptr() for p in params], grad_key, _absent(grad_ptrs), states, rows, devices)

    # -- checkpointing -------------------------------------------------------------------------------------------

    def _indexed_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """torch's layout: {"state": {index: entry}, "param_groups": [...]}; entries per the module docstring. Runs
        the hooks of torch's `register_state_dict_pre_hook` / `register_state_dict_post_hook` as torch does."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
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
                    # absmax as a copy: it shares a byte buffer with the uint8 codes, and torch.save refuses one
                    # storage viewed as two dtypes
                    entry[name] = tensor.clone() if name.startswith("absmax") else tensor.view(p.shape)
                state[index] = entry
        state_dict = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = _hook_result(post_hook(self, state_dict), state_dict)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and states from `state_dict()` output of an optimizer over the same parameters.
        Runs the hooks of torch's `register_load_state_dict_pre_hook` (which may return a new dict) and
        `register_load_state_dict_post_hook` as torch does."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = _hook_result(pre_hook(self, state_dict), state_dict)
        _check_structure(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(saved['params'])} params in the state dict, "
                                 f"{len(group['params'])} here")
        _check_saved_indices(saved_groups)
        params = self._indexed_params()
        index_of = {saved_index: i for i, saved_index in enumerate(
            index for saved in saved_groups for index in saved["params"])}
        incoming = {}
        for saved_index, entry in state_dict["state"].items():
            if saved_index not in index_of:
                raise ValueError(f"state dict has state for param {saved_index!r}, which no param group lists")
            p = params[index_of[saved_index]]
            incoming[p] = self._check_entry(index_of[saved_index], p, entry)
        merged = [{**group, **{k: v for k, v in saved.items() if k != "params"}}
                  for saved, group in zip(saved_groups, self.param_groups)]
        for group in merged:
            _check_hyperparameters(group)
        for group, new in zip(self.param_groups, merged):
            group.update(new)
        self._plan = None
        self._clear_state()
        for p, entry in incoming.items():
            state = self.state[p]
            state["step"] = int(entry["step"])
            self._load_state_tensors(p, state, entry)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_entry(self, index: int, p: torch.Tensor, entry: dict) -> dict:
        fields = STATE_FIELDS_8 if self.eight_bit(p) else STATE_FIELDS_32
        if not isinstance(entry, dict):
            raise TypeError(f"state of param {index} must be a dict of tensors, got {type(entry).__name__}")
        if set(entry) != {"step", *fields}:
            raise ValueError(f"state of param {index} has keys {sorted(entry)}; this optimizer "
                             f"({self.optim_bits}-bit, numel {p.numel()}) expects {sorted(('step', *fields))}")
        _check_saved_step(index, entry["step"])
        layout, _ = state_layout(p.numel(), self.eight_bit(p))
        for name, dtype, count, _ in layout:
            tensor = entry[name]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"state {name!r} of param {index} must be a tensor, got {type(tensor).__name__}")
            # found here, not when it is copied: by then the optimizer's states are cleared
            if tensor.is_meta or tensor.layout != torch.strided:
                raise ValueError(f"state {name!r} of param {index} is a {'meta' if tensor.is_meta else tensor.layout} "
                                 f"tensor; expected a dense tensor with data")
            if tensor.numel() != count or (name not in ("absmax1", "absmax2") and tensor.shape != p.shape):
                raise ValueError(f"state {name!r} of param {index} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(p.shape) if count == p.numel() else (count,)}")
            if tensor.dtype != dtype and not (dtype == torch.float32 and tensor.is_floating_point()):
                raise ValueError(f"state {name!r} of param {index} has dtype {tensor.dtype}, expected {dtype}")
        return entry
