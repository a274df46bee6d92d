"""Which implementation runs: the Triton kernels or the pure-PyTorch references.

The one documented override is the environment variable ``NF4LORA_KERNELS`` (read at call time,
so tests and users can set it without re-importing) and the ``use_kernels`` context manager,
which takes precedence over the variable in its own thread while it is active:

- ``auto`` (default): Triton on CUDA tensors when Triton imports, the reference elsewhere and under
  torch.func transforms or forward-mode AD.
- ``triton``: the Triton kernels everywhere. On CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before ``triton`` is first imported; CI tests the kernels that way.
- ``reference``: the pure-PyTorch references everywhere, on any device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch
from torch.autograd import forward_ad

from nf4lora.nf4.blockwise import FLOAT_DTYPES

MODES = ("auto", "triton", "reference")
ENV_VAR = "NF4LORA_KERNELS"

_override = threading.local()


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not a kernel mode; expected one of {MODES}")
    return mode


# Per-process caches as plain dicts, not functools caches: torch.compile traces through these functions and warns
# about every functools cache it meets.
_ENV_MODES: dict[str, str] = {}  # $NF4LORA_KERNELS value -> parsed mode
_PROCESS: dict[str, object] = {}  # triton_available, interpreting
_PROPERTIES: dict[int, object] = {}  # GPU index -> torch.cuda.get_device_properties
_AUTOCAST_TYPES: dict[str, bool] = {}  # device type -> whether torch.autocast exists for it


def kernel_mode() -> str:
    """The active mode: the innermost ``use_kernels`` block, else ``$NF4LORA_KERNELS``, else ``auto``."""
    stack = getattr(_override, "stack", None)
    if stack:
        return stack[-1]
    # read on every call (a test or user may set it at any time); its parse is cached, as every op asks
    raw = os.environ.get(ENV_VAR, "auto")
    mode = _ENV_MODES.get(raw)
    if mode is None:
        mode = _ENV_MODES[raw] = _check_mode(raw.strip().lower() or "auto", ENV_VAR)
    return mode


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on ``device`` while it is enabled there, else None.

    Note: autocast reaches neither the Triton kernels nor the in-place and mixed-dtype ops inside the custom
    autograd Functions, so their entry points cast their inputs to this dtype themselves, as ``F.linear`` would be
    cast, and run with autocast off; forward and backward then see one dtype on every path.
    """
    kind = device.type
    available = _AUTOCAST_TYPES.get(kind)
    if available is None:  # torch raises when asked about autocast on a device type without it (meta)
        available = _AUTOCAST_TYPES[kind] = torch.amp.is_autocast_available(kind)
    return torch.get_autocast_dtype(kind) if available and torch.is_autocast_enabled(kind) else None


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Force ``mode`` (``auto``, ``triton`` or ``reference``) for calls made inside the block.

    Thread-local and nestable; it overrides ``$NF4LORA_KERNELS`` while active. The backward of ``nf4_linear`` and of
    the LoRA layers runs in the mode of its forward, on whichever thread autograd runs it.
    """
    _check_mode(mode, "mode")
    stack = getattr(_override, "stack", None)
    if stack is None:
        stack = _override.stack = []
    stack.append(mode)
    try:
        yield
    finally:
        stack.pop()


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is Linux-only). Cached: every op asks."""
    if "triton" not in _PROCESS:
        _PROCESS["triton"] = importlib.util.find_spec("triton") is not None
    return _PROCESS["triton"]


def use_triton(device: torch.device) -> bool:
    """Whether an op on ``device`` should run its Triton kernel under the active mode.

    ``auto`` takes the reference under a torch.func transform or forward-mode AD (``transform_active``). ``triton``
    there, on a machine without the package, on a CPU tensor outside the interpreter, or on any other device (meta),
    raises instead of silently falling back, since a forced mode that is ignored would make tests pass without testing anything.
    """
    mode = kernel_mode()
    if mode == "reference":
        return False
    if transform_active():
        if mode == "triton":
            raise ValueError(f"{ENV_VAR}='triton' cannot run under torch.func transforms (vmap, grad, jvp) or "
                             "forward-mode AD: the kernels read raw storage; use 'auto' or 'reference'")
        return False
    if mode == "triton":
        if not triton_available():
            raise ValueError(f"{ENV_VAR}='triton' but the triton package is not installed; use 'auto' or 'reference'")
        if device.type == "cpu" and not interpreting():
            raise ValueError(f"{ENV_VAR}='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is "
                             "imported; move the tensor to the GPU or use 'auto' or 'reference'")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{ENV_VAR}='triton' has no kernels for {device.type} tensors; valid: cuda (cpu under "
                             "TRITON_INTERPRET=1), or use 'auto' or 'reference'")
        return True
    return device.type == "cuda" and triton_available()


def transform_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) or a forward-mode AD level is active: its tensors wrap
    others or carry tangents, which a Triton kernel, reading raw storage, fails on or silently drops; ``auto`` then
    takes the references, plain torch ops that every transform batches and differentiates."""
    return torch._C._functorch.maybe_current_level() is not None or forward_ad._current_level >= 0


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``, where kernels run on CPU tensors through Triton's interpreter.

    Read once: ``triton.jit`` makes a kernel interpreted or compiled when the kernel's module is imported, so the
    answer cannot change afterwards (and every launch asks)."""
    if "interpret" not in _PROCESS:
        _PROCESS["interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _PROCESS["interpret"]


def is_other_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a GPU other than the current one: Triton launches on the current GPU, and a model
    split over GPUs calls the kernels with another GPU's tensors."""
    return device.type == "cuda" and device.index != torch.cuda.current_device()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` when ``device`` is a GPU other than the current one, else a no-op."""
    return torch.cuda.device(device) if is_other_gpu(device) else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. ``triton.cdiv`` is a constexpr function whose wrapper costs about 3 us a call
    from Python, and a decode step makes a hundred such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host code (``triton.next_power_of_2``: as ``cdiv``)."""
    return 1 << (n - 1).bit_length()


def tuning_space(configs: list) -> list:
    """The autotune configs to try: all of them on a GPU, only the first under the interpreter (tests)."""
    return configs[:1] if interpreting() else configs


def _properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of CUDA ``device`` (the current GPU when it has no index), cached."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROPERTIES:
        _PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return _PROPERTIES[index]


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` for sizing grids; 4 under the interpreter or off CUDA."""
    if interpreting() or device.type != "cuda":
        return 4
    return _properties(device).multi_processor_count


def _capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of CUDA ``device``; None off CUDA."""
    if device.type != "cuda":
        return None
    props = _properties(device)
    return props.major, props.minor


def hopper_or_later(device: torch.device) -> bool:
    """Whether ``device`` is a GPU of compute capability 9.0 or later, which has TMA and programmatic dependent
    launch; False off CUDA."""
    capability = _capability(device)
    return capability is not None and capability >= (9, 0)


def is_hopper(device: torch.device) -> bool:
    """Whether ``device`` is a compute capability 9.0 GPU (H100, H200, GH200); False off CUDA."""
    return _capability(device) == (9, 0)


def has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use the tensor memory accelerator (Hopper, sm_90, and later); True under
    the interpreter, which emulates it, so that CI runs the same kernels as such a GPU."""
    return interpreting() or hopper_or_later(device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: IEEE for fp32, whose products the kernels must
    keep exact to meet fp32 tolerances (TF32 keeps 10 mantissa bits); 16-bit operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
