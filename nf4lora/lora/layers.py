"""``LoraLinear``: named LoRA/DoRA adapters on a frozen ``nn.Linear`` or ``NF4Linear`` base.

The module tree mirrors peft's ``lora.Linear`` so state-dict names map 1:1:
``base_layer``, ``lora_A.<adapter>`` (``nn.Linear(in, r, bias=False)``), ``lora_B.<adapter>``
(``nn.Linear(r, out)``, with a bias (out,) only for ``lora_bias=True``), ``lora_dropout.<adapter>``
and, with DoRA, ``lora_magnitude_vector.<adapter>.weight`` (out,). ``ModulesToSave`` mirrors peft's wrapper
(``original_module`` plus a trainable copy per adapter under ``modules_to_save.<adapter>``).

Several adapters can live on one layer; ``active_adapters`` (a list, usually one name) selects
which ones run. ``disable_adapters`` bypasses all of them. ``merge``/``unmerge`` fold the active
adapters into a dense base weight and back (fp32 arithmetic, cast once to the weight dtype, so the
round trip is exact up to that rounding); a LoRA bias folds into the base bias the same way. An NF4
base cannot be merged in place: its merged weight (and bias) is produced densely by ``merged_weight``
(``merged_bias``) and installed by ``nf4lora.lora.model.merge_and_unload``.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from nf4lora.kernels import nf4_linear
from nf4lora.lora.config import LoraConfig
from nf4lora.lora.functional import dora_update, dora_weight_norm, lora_add, lora_delta_weight
from nf4lora.lora.fused import dense_weight, lora_linear
from nf4lora.nf4.linear import NF4Linear, output_in_dtype


def check_adapter_name(name: object) -> None:
    """Raise unless ``name`` can key an adapter: a non-empty string without '.' (it becomes a submodule name)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name={name!r} is not valid; expected a non-empty name without '.'")


def adapter_name_list(adapter_names: object) -> list[str] | None:
    """``adapter_names`` as a list (None stays None); a bare string is refused, as peft refuses it, rather than
    read as the list of its characters."""
    if adapter_names is None:
        return None
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names={adapter_names!r} is not a list; expected a list of adapter names, e.g. "
                        "['default'], or None for the active ones")
    return list(adapter_names)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a base layer LoRA can wrap: ``nn.Linear`` or ``NF4Linear``."""
    return isinstance(module, (nn.Linear, NF4Linear))


def base_matmul(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` without the bias, in x.dtype, differentiable w.r.t. x only."""
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight.detach().to(x.dtype))
    return nf4_linear(x, base.weight, None)


def base_bias(base: nn.Module) -> torch.Tensor | None:
    """The bias ``base`` adds, as its forward adds it: ``nn.Linear``'s as held, ``NF4Linear``'s cast to its compute
    dtype (it holds it in the model's); None without one."""
    return base.bias if isinstance(base, nn.Linear) else base.compute_bias()


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude, one per output row: ``weight`` (out,)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class LoraLinear(nn.Module):
    """A frozen linear base plus named LoRA adapters: ``y = base(x) + scaling * (dropout(x) @ A.T @ B.T + b)``,
    b being B's bias (``lora_bias=True``) or nothing.

    base_layer: ``nn.Linear`` or ``NF4Linear`` with weight (out, in). Input x (..., in): in the
    weight's dtype for ``nn.Linear``, any float dtype for ``NF4Linear`` (cast to its compute dtype).
    Output (..., out) in that compute dtype, in which the LoRA matmuls also run.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"LoraLinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merge_norms: dict[str, torch.Tensor] = {}
        self.add_adapter(adapter_name, config)

    @property
    def is_nf4(self) -> bool:
        return not isinstance(self.base_layer, nn.Linear)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _weight_device(self) -> torch.device:
        return self.base_layer.weight.device

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Create adapter ``name`` (A (r, in), B (out, r) and B's bias (out,) in ``config.lora_dtype``) and initialise
        it. ``config`` holds this module's own r and alpha (``LoraConfig.for_module``), without patterns."""
        check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; existing: {sorted(self.lora_A)}")
        if config.rank_pattern or config.alpha_pattern:
            raise ValueError(f"config has rank_pattern={config.rank_pattern}, alpha_pattern={config.alpha_pattern}; "
                             "expected config.for_module(<this module's name>), which resolves them")
        kw = {"dtype": config.lora_dtype, "device": self._weight_device()}
        # uninitialised here: reset_adapter draws the values
        self.lora_A[name] = nn.utils.skip_init(nn.Linear, self.in_features, config.r, bias=False, **kw)
        self.lora_B[name] = nn.utils.skip_init(nn.Linear, config.r, self.out_features, bias=config.lora_bias, **kw)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[name] = config.r
        self.scaling[name] = config.scaling
        self.reset_adapter(name, config.init_lora_weights)
        if config.use_dora:
            norm = self.dora_norm(name)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(config.lora_dtype))

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str) -> None:
        """peft's initialisations: True (A Kaiming-uniform a=sqrt(5), B = 0), "gaussian" (A ~ N(0, 1/r), B = 0),
        False (A and B both Kaiming-uniform a=sqrt(5), so the adapter changes outputs from the start). B's bias, if
        any, is 0, or for False ``nn.Linear``'s default U(-1/sqrt(r), 1/sqrt(r)), which peft leaves there.

        The values are drawn on the CPU from torch's default generator and then copied to the adapter's device, as
        peft does (it initialises before moving to the base's device): one seed gives the same adapters whether
        the model sits on the CPU, one GPU or several, where each GPU's own generator would give different ones."""
        if init != "gaussian" and not isinstance(init, bool):
            raise ValueError(f"init_lora_weights={init!r} is not supported; expected True, False or 'gaussian'")
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        a_init = torch.empty(a.shape, dtype=a.dtype)
        if init == "gaussian":
            nn.init.normal_(a_init, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(a_init, a=math.sqrt(5))
        a.copy_(a_init)
        bias = self.lora_B[name].bias
        if init is False:
            b.copy_(nn.init.kaiming_uniform_(torch.empty(b.shape, dtype=b.dtype), a=math.sqrt(5)))
            if bias is not None:
                bound = 1 / math.sqrt(self.r[name])
                bias.copy_(nn.init.uniform_(torch.empty(bias.shape, dtype=bias.dtype), -bound, bound))
        else:
            b.zero_()
            if bias is not None:
                bias.zero_()

    def dora_norm(self, name: str) -> torch.Tensor:
        """(out,) fp32 row norms of ``W + scaling * B @ A`` for adapter ``name`` on the base weight W, detached."""
        w = dense_weight(self.base_layer.weight, torch.float32)
        return dora_weight_norm(w, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = [] if self.disable_adapters or self.merged else [n for n in self.active_adapters if n in self.lora_A]
        if not active:
            return self.base_layer(x)
        if torch.is_grad_enabled() and active[0] not in self.lora_magnitude_vector and not self._trains_base_weight():
            # Training: the first plain-LoRA adapter runs fused with the base matmul (fused.py).
            y, rest = self._fused_forward(active[0], x), active[1:]
        else:
            y, rest = self.base_layer(x), active
        for name in rest:
            y = self._add_adapter_output(name, x, y)
        return y

    def _trains_base_weight(self) -> bool:
        """Whether the base weight takes gradients (an nn.Linear weight left trainable, as peft then trains it): the
        fused node treats its weight as frozen, so such a base runs unfused."""
        return isinstance(self.base_layer, nn.Linear) and self.base_layer.weight.requires_grad

    def _compute_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the base's compute dtype (NF4Linear casts its input; nn.Linear takes x as is)."""
        return x if isinstance(self.base_layer, nn.Linear) else x.to(self.base_layer.compute_dtype)

    def _lora_weights(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)

    def _fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The base layer and adapter ``name`` in one node, in the base's compute dtype; out in the dtype of the base
        layer's own output (x's dtype for NF4Linear, the compute dtype for nn.Linear, which autocast may change)."""
        dtype = x.dtype
        x = self._compute_input(x)
        dropout = self.lora_dropout[name]
        x_lora = x if isinstance(dropout, nn.Identity) else dropout(x)
        base, lora_b_bias = self.base_layer, self.lora_B[name].bias
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        bias = base_bias(base)
        if lora_b_bias is not None:  # rides in the node's bias (an (N,) add; its gradient flows back through it)
            lora_term = self.scaling[name] * lora_b_bias.to(x.dtype)
            bias = lora_term if bias is None else bias + lora_term
        y = lora_linear(x, x_lora, base.weight, bias, lora_a, lora_b, self.scaling[name])
        return y if isinstance(base, nn.Linear) else output_in_dtype(y, dtype)

    def _add_adapter_output(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base output plus earlier adapters) plus adapter ``name``'s LoRA or DoRA term."""
        dtype = y.dtype
        lora_a, lora_b = self._lora_weights(name, dtype)
        dropout = self.lora_dropout[name]
        x_lora = dropout(x.to(dtype))
        if name not in self.lora_magnitude_vector:
            y = lora_add(y, x_lora, lora_a, lora_b, self.scaling[name])
            lora_b_bias = self.lora_B[name].bias
            return y if lora_b_bias is None else y + self.scaling[name] * lora_b_bias.to(dtype)
        if self.training and isinstance(dropout, nn.Dropout):
            base_nobias = base_matmul(self.base_layer, x_lora)
        elif self.base_layer.bias is not None:
            base_nobias = y - base_bias(self.base_layer).to(dtype)
        else:
            base_nobias = y
        magnitude = self.lora_magnitude_vector[name].weight
        return dora_update(y, base_nobias, x_lora, lora_a, lora_b, magnitude, self.dora_norm(name), self.scaling[name])

    def merged_weight(self, adapter_names: list[str] | None = None, dtype: torch.dtype = torch.float32,
                      base_dtype: torch.dtype = torch.float32, held_dtypes: bool = False) -> torch.Tensor:
        """Dense (out, in) weight in ``dtype`` with ``adapter_names`` (default: the active ones) folded in,
        in the order given, as ``forward`` applies them, from the base weight in ``base_dtype`` (on an NF4 base, its
        dequantization to it: peft's 4-bit merge takes the weight's own dtype).

        The fold runs in fp32, or with ``held_dtypes`` as peft's merge runs it: every operand in the dtype it is held
        in (the base in ``base_dtype``, ``B @ A`` in the adapter's), each step in the dtype torch promotes them to.
        For fp32 adapters that promotes every step to fp32, so the two give the same numbers; for bf16 or fp16 ones,
        peft rounds ``B @ A`` and, for DoRA on a base of the same dtype, every step to that dtype."""
        if self.merged:
            raise ValueError(f"adapters {self.merged_adapters} are merged into the base already; unmerge() first")
        base = dense_weight(self.base_layer.weight, base_dtype)
        names = self._adapter_names(adapter_names)
        return self._fold(names, base if held_dtypes else base.float(), held_dtypes)[0].to(dtype)

    def merged_bias(
        self, adapter_names: list[str] | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor | None:
        """(out,) base bias in ``dtype`` with the LoRA biases of ``adapter_names`` (default: the active ones) folded
        in, beside ``merged_weight``; None for a base without a bias (``check_mergeable`` refuses LoRA biases there)."""
        names = self._adapter_names(adapter_names)
        self.check_mergeable(names)
        bias = self.base_layer.bias
        return None if bias is None else self._fold_bias(names, bias.detach().float()).to(dtype)

    def merged_dtypes(self, adapter_names: list[str] | None = None) -> tuple[torch.dtype, torch.dtype | None]:
        """The dtypes peft forms a merge into a 4-bit base in (weight, bias; None for a base without a bias): the base
        weight's original dtype and the base bias's, each promoted by the dtypes of what the LoRA adapters among
        ``adapter_names`` (default: the active ones) add to it (B @ A; the LoRA biases), since peft adds them as
        they are: fp32 adapters on an fp16 base give fp32. A DoRA adapter's merge casts back to the weight's dtype.
        """
        names = self._adapter_names(adapter_names)
        added = [p.dtype for n in names if n not in self.lora_magnitude_vector
                 for p in (self.lora_A[n].weight, self.lora_B[n].weight)]
        weight = functools.reduce(torch.promote_types, added, self.base_layer.weight.dtype)
        bias = self.base_layer.bias
        if bias is None:
            return weight, None
        lora_biases = [self.lora_B[n].bias.dtype for n in names if self.lora_B[n].bias is not None]
        return weight, functools.reduce(torch.promote_types, lora_biases, bias.dtype)

    def unmerged_bias(self) -> torch.Tensor | None:
        """(out,) base bias without the LoRA biases of the merged adapters, in the bias's dtype (the bias itself when
        none is merged); None for a base without a bias. What a bias mode saves: loading adds the LoRA biases again."""
        bias = self.base_layer.bias
        if bias is None or not self.merged_adapters:
            return bias
        return self._fold_bias(self.merged_adapters[::-1], bias.detach().float(), sign=-1.0).to(bias.dtype)

    def check_mergeable(self, adapter_names: list[str] | None = None) -> None:
        """Raise if adapters ``adapter_names`` (default: the active ones) hold a LoRA bias and the base layer has no
        bias to fold it into (peft refuses that merge too)."""
        biased = [n for n in self._adapter_names(adapter_names) if self.lora_B[n].bias is not None]
        if biased and self.base_layer.bias is None:
            raise ValueError(f"adapters {biased} have a LoRA bias (lora_bias=True) and the base layer has no bias to "
                             "merge it into; expected a base with a bias, or the adapters left unmerged")

    def _adapter_names(self, adapter_names: list[str] | None) -> list[str]:
        """The requested adapters, deduplicated; None means the active ones this layer holds."""
        adapter_names = adapter_name_list(adapter_names)
        if adapter_names is None:
            return [n for n in dict.fromkeys(self.active_adapters) if n in self.lora_A]
        names = list(dict.fromkeys(adapter_names))
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this layer has {sorted(self.lora_A)}")
        return names

    def _fold(self, names: list[str], base: torch.Tensor, held_dtypes: bool = False
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``base`` with adapters ``names`` folded in turn, and the DoRA norms used (by adapter): in fp32 for an fp32
        ``base``, or with ``held_dtypes`` in the dtypes torch promotes the held operands to (``merged_weight``).

        LoRA adds ``scaling * B @ A`` (``_delta_weight``); DoRA then scales every row by
        ``m / ||W_base + scaling * B @ A||``, the norm taken from the unmerged base as ``forward`` (and peft's merge)
        takes it, of the same update that is added.
        """
        w, norms = base, {}
        for name in names:
            delta = self._delta_weight(name, held_dtypes)
            w = w + delta
            if name in self.lora_magnitude_vector:
                norms[name] = torch.linalg.vector_norm(base + delta, dim=1).detach()
                magnitude = self.lora_magnitude_vector[name].weight.detach()
                w = ((magnitude if held_dtypes else magnitude.float()) / norms[name])[:, None] * w
        return w, norms

    def _delta_weight(self, name: str, held_dtype: bool = False) -> torch.Tensor:
        """(out, in) ``scaling * B @ A`` of adapter ``name``, detached: in fp32, or (``held_dtype``) as peft's merge
        forms it, ``(B @ A) * scaling`` in A's and B's dtype."""
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        if not held_dtype:
            return lora_delta_weight(a, b, self.scaling[name])
        dtype = torch.promote_types(a.dtype, b.dtype)
        with torch.autocast(a.device.type, enabled=False):
            return (b.to(dtype) @ a.to(dtype)) * self.scaling[name]

    def _fold_bias(self, names: list[str], bias: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """fp32 ``bias`` plus (``sign=-1``: minus) ``scaling * b`` for each adapter of ``names`` with a LoRA bias b."""
        for name in names:
            lora_b_bias = self.lora_B[name].bias
            if lora_b_bias is not None:
                bias = bias + sign * self.scaling[name] * lora_b_bias.detach().float()
        return bias

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold ``adapter_names`` (default: active) into the dense base weight (and LoRA biases into its bias), in
        fp32, cast once.

        Adapters merged before stay merged (the weight is rebuilt from the unmerged base)."""
        if self.is_nf4:
            raise ValueError(
                "cannot merge in place into an NF4 base (it would re-quantize); "
                "use nf4lora.lora.merge_and_unload(model, requantize=False|True) or merged_weight()"
            )
        names = self._adapter_names(self.merged_adapters + self._adapter_names(adapter_names))
        self.check_mergeable(names)  # before unmerge: a refusal changes nothing
        self.unmerge()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        w, self._merge_norms = self._fold(names, weight.float())
        weight.copy_(w.to(weight.dtype))
        if bias is not None:
            bias.copy_(self._fold_bias(names, bias.float()).to(bias.dtype))
        self.merged_adapters = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` in reverse order (exact up to the rounding to the weight dtype)."""
        if not self.merged_adapters:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        w, unmerged_bias = weight.float(), self.unmerged_bias()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            delta = lora_delta_weight(a, b, self.scaling[name])
            if name in self.lora_magnitude_vector:
                w = w / (self.lora_magnitude_vector[name].weight.float() / self._merge_norms.pop(name))[:, None]
            w = w - delta
        weight.copy_(w.to(weight.dtype))
        if bias is not None:
            bias.copy_(unmerged_bias)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={self.r[n]}{' dora' if n in self.lora_magnitude_vector else ''}"
            f"{' lora_bias' if self.lora_B[n].bias is not None else ''}" for n in self.r
        )
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}], active={self.active_adapters}"


class ModulesToSave(nn.Module):
    """A module trained in full per adapter: ``original_module`` (frozen) and ``modules_to_save.<adapter>`` copies."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = [adapter_name]
        self.disable_adapters = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        check_adapter_name(name)
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def active_module(self) -> nn.Module:
        """The module that runs: the first active adapter's copy, or the original when none is active."""
        active = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.disable_adapters or not active:
            return self.original_module
        return self.modules_to_save[active[0]]

    @property
    def weight(self) -> torch.Tensor:
        """The running module's weight, as peft's wrapper gives it (callers read its device and dtype)."""
        return self.active_module().weight

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)
