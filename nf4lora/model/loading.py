"""`load_model`: a Hugging Face Llama checkpoint -> `Llama`, dense or quantized to NF4/FP4 tensor by tensor.

The model is built on the `meta` device, then every tensor of the checkpoint is read (safetensors, one at a time),
shape-checked against the config, cast, moved to its device and, for quantized linears, quantized there before
the next one is read. Peak memory is therefore the final model plus one tensor, on the host and on the GPU.

Names: ours are Hugging Face's (`llama.py`), so the table below is the identity plus `DROPPED_KEYS`. Every
checkpoint key is consumed or matches a dropped pattern; anything else is an error, as is any parameter left
unloaded. Pre-quantized checkpoints (transformers + bitsandbytes 4-bit: `<linear>.weight` packed uint8 with
`.absmax`, `.quant_map`, `.nested_*` and `.quant_state.bitsandbytes__{nf4,fp4}` siblings) load as NF4Linear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re

import torch
from torch import nn

from .checkpoint import DTYPE_BYTES, TensorEntry, checkpoint_index, resolve_model_dir, write_checkpoint
from .config import LlamaConfig
from .llama import Llama

QUANTIZATIONS = (None, "nf4", "fp4")
# Non-persistent buffers that older transformers versions saved; our RoPE is recomputed from the config.
DROPPED_KEYS = (re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),)
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                ".quant_state.bitsandbytes__fp4")
# safetensors dtypes a dense parameter may be stored in (cast to the load dtype, as transformers casts them)
FLOAT_STORAGE_DTYPES = ("F64", "F32", "F16", "BF16")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclasses.dataclass
class LoadOptions:
    """What `load_model` accepts as keyword options; names mirror transformers' `BitsAndBytesConfig` meanings.

    blocksize / double_quant / compute_dtype: the 4-bit format (bnb_4bit_use_double_quant, bnb_4bit_compute_dtype;
    compute_dtype defaults to a pre-quantized checkpoint's bnb_4bit_compute_dtype, as in transformers, else to
    `dtype`). skip_modules: linear names (or name suffixes) kept dense when quantizing a dense checkpoint, like
    llm_int8_skip_modules, matched as transformers matches them (`_skipped`); `lm_head` by default. device_map:
    alias of `device`.
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | str | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)
    gradient_checkpointing: bool = False
    device_map: str | torch.device | None = None

    def __post_init__(self) -> None:
        from nf4lora.nf4.tensor import check_blocksize

        # checked even for a dense load, which ignores them: a typo must not wait for the first quantized load
        self.blocksize = check_blocksize(self.blocksize)
        for flag in ("double_quant", "gradient_checkpointing"):
            # bool("no") is True: a string or number here would silently switch the option on
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} is not a bool; valid: True, False")
        if self.compute_dtype is not None:
            self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        # one name is one module: iterating the string would skip single-letter "modules" and so nothing
        if isinstance(self.skip_modules, str):
            self.skip_modules = (self.skip_modules,)
        if not isinstance(self.skip_modules, (list, tuple)):
            raise ValueError(f"skip_modules={self.skip_modules!r} is not a list of names; valid: a name, or a list "
                             f"or tuple of names and regexes (() quantizes every linear layer)")
        for pattern in self.skip_modules:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"skip_modules entry {pattern!r} is not a module name or regular expression ({e}); "
                                 f"valid: names such as 'lm_head', suffixes such as 'down_proj', or regexes") from None

    @classmethod
    def from_kwargs(cls, options: dict, keywords: tuple[str, ...] = ()) -> LoadOptions:
        """The options of ``options``; unknown names are refused in one line naming the valid ones: the fields and
        ``keywords``, the caller's own keyword arguments (a misspelt one lands among the options)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise TypeError(f"load_model got unknown option(s) {unknown}; valid: {fields + list(keywords)}")
        return cls(**options)


def parse_dtype(dtype: torch.dtype | str, name: str = "dtype") -> torch.dtype:
    """`dtype` (a torch dtype or a name such as "bf16" or "torch.float32") as a torch dtype; a ValueError naming the
    argument `name` and the valid values otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{name} {dtype!r} is not supported; valid: {sorted(_DTYPES)}")


def _checkpoint_dtype(config: LlamaConfig, index: dict[str, TensorEntry], model_dir: str) -> torch.dtype:
    """dtype="auto" as transformers resolves it: config.json's dtype (torch_dtype before transformers 5), else the
    dtype of the checkpoint's first float tensor."""
    declared = config.extra.get("dtype") or config.extra.get("torch_dtype")
    if declared is not None:
        source = f"{model_dir}/config.json's dtype"
    else:
        stored = next((e.dtype for e in index.values() if e.dtype in FLOAT_STORAGE_DTYPES), None)
        declared, source = _SAFETENSORS_DTYPES.get(stored, stored), f"{model_dir}'s float tensors"
    try:
        return parse_dtype(declared)
    except ValueError:
        raise ValueError(f"dtype='auto' resolves to {declared!r} ({source}); valid: {sorted(_DTYPES)}, or pass "
                         f"one of them as dtype") from None


def _skipped(name: str, skip_modules) -> bool:
    """Whether module `name` stays dense, by transformers 5's rule (should_convert_module): an entry matches as a
    regex from the start of the name up to a module boundary ("model.layers.1" is layer 1, not 11), or as a plain
    suffix of the name ("proj" matches every *_proj)."""
    return any(re.match(rf"(?:{s})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(s) for s in skip_modules)


def _prequantized_format(config: LlamaConfig, source: str) -> tuple[str, torch.dtype | None] | None:
    """(bnb_4bit_quant_type, bnb_4bit_compute_dtype or None) of a transformers + bitsandbytes 4-bit checkpoint, read
    as transformers reads them (an absent quant type is fp4, BitsAndBytesConfig's default), or None for a dense one."""
    qc = config.extra.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{source}: quantization_config {qc.get('quant_method')!r} "
                         f"(load_in_8bit={qc.get('load_in_8bit')}) is not supported; valid: bitsandbytes 4-bit")
    quant_type, compute = qc.get("bnb_4bit_quant_type", "fp4"), qc.get("bnb_4bit_compute_dtype")
    if quant_type not in QUANTIZATIONS[1:]:
        raise ValueError(f"{source}: quantization_config has bnb_4bit_quant_type {quant_type!r}; valid: "
                         f"{', '.join(QUANTIZATIONS[1:])}")
    if compute is None:
        return quant_type, None
    try:
        return quant_type, parse_dtype(compute)
    except ValueError:
        raise ValueError(f"{source}: quantization_config has bnb_4bit_compute_dtype {compute!r}; valid: "
                         f"{sorted(_DTYPES)}") from None


def plan_device_map(layer_bytes: list[int], head_bytes: int, free_bytes: list[int], headroom: float = 0.9) -> list[int]:
    """GPU index for each decoder layer, in proportion to each GPU's free memory (transformers' balanced "auto").

    `head_bytes` (embeddings, final norm, output head) is charged to the first GPU. Each GPU may fill up to
    `headroom` of its free memory; raises ValueError naming the sizes when the model does not fit.
    """
    capacity = [int(f * headroom) for f in free_bytes]
    total = sum(layer_bytes) + head_bytes
    if total > sum(capacity):
        raise ValueError(f"model needs {total / 2**30:.2f} GiB but the GPUs have {sum(capacity) / 2**30:.2f} GiB "
                         f"usable ({headroom:.0%} of free {[round(f / 2**30, 2) for f in free_bytes]} GiB)")
    shares = [total * f / sum(free_bytes) for f in free_bytes]
    plan, device, used = [], 0, head_bytes
    for nbytes in layer_bytes:
        # a GPU past its share passes the next layer on, but only once it holds one: the embeddings are placed
        # with the first layer, so the first layer stays on the GPU they were charged to while it fits
        over_share = bool(plan) and plan[-1] == device and used + nbytes > shares[device]
        while device < len(free_bytes) - 1 and (over_share or used + nbytes > capacity[device]):
            device, used, over_share = device + 1, 0, False
        if used + nbytes > capacity[device]:
            raise ValueError(f"decoder layers do not fit: GPU {device} would need {(used + nbytes) / 2**30:.2f} GiB "
                             f"of {capacity[device] / 2**30:.2f} GiB usable")
        plan.append(device)
        used += nbytes
    return plan


def _estimate_layer_bytes(config, index: dict[str, TensorEntry], quantize: bool, opts: LoadOptions, dtype) -> tuple:
    """(bytes per decoder layer, bytes of everything else) after loading, from the checkpoint headers."""
    per_layer = [0] * config.num_hidden_layers
    other = 0
    for name, entry in index.items():
        numel = entry.nbytes // DTYPE_BYTES[entry.dtype]
        if quantize and name.endswith("_proj.weight") and not _skipped(name[: -len(".weight")], opts.skip_modules):
            nbytes = numel // 2 + numel // opts.blocksize * (1 if opts.double_quant else 4)
        elif entry.dtype == "U8" or any(name.endswith(s) for s in BNB_SUFFIXES):
            nbytes = entry.nbytes
        else:
            nbytes = numel * dtype.itemsize
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) < len(per_layer):
            per_layer[int(m.group(1))] += nbytes
        else:
            other += nbytes
    return per_layer, other


def _resolve_device(device, device_map):
    """The one device that `device` and its alias `device_map` name; refuses two that disagree (device's default,
    "cpu", gives way to any device_map)."""
    if device_map is None:
        return device
    if isinstance(device_map, (str, torch.device)) and str(device) not in ("cpu", str(device_map)):
        raise ValueError(f"device={str(device)!r} and device_map={str(device_map)!r} disagree; valid: pass one of "
                         f"them, or both the same")
    return device_map


def _check_device(device, name: str = "device") -> None:
    """Refuse, in one line naming the argument `name`, a device torch cannot parse, one the loader does not place
    tensors on (meta would leave every weight unloaded; mps, xpu, ... are not supported), or a CUDA device this
    machine does not have."""
    if isinstance(device, str) and device == "auto":
        return
    valid = "'cpu', 'cuda', 'cuda:N', 'auto'"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={device!r} is not a device; valid: {valid}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}={str(device)!r} is not supported; valid: {valid}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"{name}={str(device)!r} but {count} CUDA device(s) are visible; valid: 'cpu', 'auto'"
                         + "".join(f", 'cuda:{i}'" for i in range(count)))


def _layer_devices(device, config, index, quantize, opts, dtype) -> list[torch.device]:
    if device != "auto":
        return [torch.device(device)] * config.num_hidden_layers
    if not torch.cuda.is_available():
        return [torch.device("cpu")] * config.num_hidden_layers
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    per_layer, other = _estimate_layer_bytes(config, index, quantize, opts, dtype)
    return [torch.device("cuda", i) for i in plan_device_map(per_layer, other, free)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def load_model(path_or_id, quantization: str | None = None, dtype: torch.dtype | str = torch.bfloat16,
               device: str | torch.device = "cpu", *, revision: str | None = None, **options) -> Llama:
    """Load a Llama checkpoint (local HF directory or hub id) as a `Llama` in eval mode.

    dtype: of the dense tensors and of the weights quantized; "auto" is config.json's dtype (else the checkpoint's),
    as in transformers.
    quantization: None (dense), "nf4" or "fp4": linears of the decoder are quantized on `device` as they are read;
    embeddings, norms and `skip_modules` stay in `dtype`. Pre-quantized bitsandbytes checkpoints load as stored
    (4-bit linears 4-bit, dense ones dense), with quantization None or their own type.
    device: "cpu", "cuda", "cuda:N", or "auto" to spread decoder layers over the visible GPUs by free memory.
    revision: of a hub id, a branch, tag or commit hash (None: main), as in transformers; refused for a local
    directory.
    options: see `LoadOptions` (blocksize, double_quant, compute_dtype, skip_modules, gradient_checkpointing).
    The bos/eos/pad ids that generation_config.json sets replace config.json's, as in transformers' generate.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; valid: {list(QUANTIZATIONS)}")
    opts = LoadOptions.from_kwargs(options, _LOAD_MODEL_KEYWORDS)
    auto_dtype = isinstance(dtype, str) and dtype == "auto"
    if not auto_dtype:
        dtype = parse_dtype(dtype)
    device = _resolve_device(device, opts.device_map)
    _check_device(device, "device_map" if opts.device_map is not None else "device")
    model_dir = resolve_model_dir(path_or_id, revision=revision)
    config = LlamaConfig.from_file(model_dir)
    config.update_from_generation_config(model_dir)
    stored_type, stored_compute_dtype = _prequantized_format(config, model_dir) or (None, None)
    if stored_type is not None and quantization not in (None, stored_type):
        raise ValueError(f"{model_dir} is pre-quantized as {stored_type}; quantization={quantization!r} cannot "
                         f"re-quantize it; valid: None or {stored_type!r}")
    if stored_type is not None:
        quantization = None  # the checkpoint says which linears are 4-bit; its dense ones stay dense
    index = checkpoint_index(model_dir)
    if auto_dtype:
        dtype = _checkpoint_dtype(config, index, model_dir)
    compute_dtype = opts.compute_dtype or stored_compute_dtype or dtype
    devices = _layer_devices(device, config, index, quantization is not None, opts, dtype)
    with torch.device("meta"):
        model = Llama(config)
    reader = _CheckpointReader(model, config, index, devices, dtype, compute_dtype, quantization, opts, model_dir,
                               stored_type)
    reader.load_all()
    model.inv_freq = model.inv_freq.to(devices[0])
    model.gradient_checkpointing = opts.gradient_checkpointing
    return model.eval()


# load_model's own keyword arguments (not path_or_id nor **options), named with the options when one is misspelt
_LOAD_MODEL_KEYWORDS = tuple(inspect.signature(load_model).parameters)[1:-1]


class _CheckpointReader:
    """Moves checkpoint tensors into a meta-built `Llama`, one at a time, checking names and shapes."""

    def __init__(self, model, config, index, devices, dtype, compute_dtype, quantization, opts, model_dir,
                 stored_type):
        self.model, self.config, self.index, self.devices = model, config, index, devices
        self.dtype, self.compute_dtype, self.quantization, self.opts = dtype, compute_dtype, quantization, opts
        self.model_dir, self.stored_type = model_dir, stored_type
        self.consumed: set[str] = set()
        self.handles: dict[str, object] = {}

    def device_of(self, name: str) -> torch.device:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            return self.devices[int(m.group(1))]
        return self.devices[0] if name.startswith("model.embed_tokens") else self.devices[-1]

    def read(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        entry = self.index[key]
        self.consumed.add(key)
        try:
            return self.handles[entry.file].get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{entry.file}: cannot read tensor {key!r}: {e}") from None

    def check_entry(self, key: str, expected: tuple[int, ...]) -> None:
        """Refuse a dense tensor whose shape is not `expected` or that is not stored as floats: cast to the load
        dtype, integer or boolean values (a 4-bit weight that lost its quant_state, say) would load as nonsense."""
        entry = self.index[key]
        if entry.dtype not in FLOAT_STORAGE_DTYPES:
            raise ValueError(f"{entry.file}: tensor {key!r} is stored as {entry.dtype}; valid: a float dtype, one "
                             f"of {list(FLOAT_STORAGE_DTYPES)}")
        if entry.shape != tuple(expected):
            raise ValueError(f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}, but the config "
                             f"({self.model_dir}/config.json) needs {list(expected)}")

    def load_all(self) -> None:
        from safetensors import SafetensorError, safe_open

        if self.stored_type is None and any(k.endswith(BNB_SUFFIXES) for k in self.index):
            raise ValueError(f"{self.model_dir}: 4-bit quant_state tensors found but config.json has no "
                             f"bitsandbytes quantization_config")
        with contextlib.ExitStack() as stack:
            for file in sorted({e.file for e in self.index.values()}):
                try:  # read_safetensors_header mirrors safetensors' checks; this names the file should they differ
                    handle = safe_open(file, framework="pt", device="cpu")
                except SafetensorError as e:
                    raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
                self.handles[file] = stack.enter_context(handle)
            linears = {name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}
            for name, param in list(self.model.named_parameters(remove_duplicate=True)):
                key = name
                if key not in self.index or key in self.consumed:  # absent, or a bias taken by its 4-bit linear
                    continue
                module_name, _, pname = name.rpartition(".")
                if pname == "weight" and module_name in linears and any(key + s in self.index for s in BNB_SUFFIXES):
                    self.load_prequantized(module_name)
                elif pname == "weight" and module_name in linears and self.quantization and not _skipped(
                        module_name, self.opts.skip_modules):
                    self.load_quantized(module_name)
                else:
                    self.check_entry(key, param.shape)
                    t = self.read(key).to(self.device_of(key), self.dtype)
                    setattr(self.model.get_submodule(module_name), pname, nn.Parameter(t))
        self.finish()

    def finish(self) -> None:
        if self.config.tie_word_embeddings:
            self.model.tie_weights()
            if "lm_head.weight" in self.index:
                self.consumed.add("lm_head.weight")  # a tied checkpoint may still store the copy; ours is shared
        dropped = {k for k in self.index if any(p.fullmatch(k) for p in DROPPED_KEYS)}
        unexpected = sorted(set(self.index) - self.consumed - dropped)
        if unexpected:
            raise ValueError(f"{self.model_dir}: checkpoint has {len(unexpected)} tensor(s) the config does not "
                             f"use, e.g. {unexpected[:3]}; is num_hidden_layers / architecture right?")
        missing = [n for n, p in self.model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"{self.model_dir}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                             f"e.g. {missing[:3]}")

    def take_bias(self, module_name: str, out_features: int) -> torch.Tensor | None:
        key = f"{module_name}.bias"
        if key not in self.index:
            return None
        self.check_entry(key, (out_features,))
        # in the load dtype, as transformers + bitsandbytes hold it (NF4Linear casts it to compute_dtype per forward)
        return self.read(key).to(self.device_of(key), self.dtype)

    def load_quantized(self, module_name: str) -> None:
        from nf4lora.kernels import quantize

        linear = self.model.get_submodule(module_name)
        key = f"{module_name}.weight"
        self.check_entry(key, linear.weight.shape)
        # quantized from the load dtype, as transformers quantizes the weights it loaded in torch_dtype: rounding to
        # a narrower compute dtype first would change the codes
        w = self.read(key).to(self.device_of(key), self.dtype)
        qweight = quantize(w, blocksize=self.opts.blocksize, quant_type=self.quantization,
                           double_quant=self.opts.double_quant)
        del w
        _set_module(self.model, module_name,
                    _nf4_linear(qweight, self.take_bias(module_name, linear.out_features), self.compute_dtype))

    def load_prequantized(self, module_name: str) -> None:
        from nf4lora.nf4.state_dict import from_bnb_state_dict

        linear = self.model.get_submodule(module_name)
        prefix = f"{module_name}.weight"
        keys = [k for k in self.index if k == prefix or (k.startswith(prefix + ".") and k.endswith(BNB_SUFFIXES))]
        device = self.device_of(prefix)
        sd = {k: self.read(k).to(device) for k in keys}
        sd[prefix] = sd[prefix].view(torch.uint8)  # bnb_4bit_quant_storage may pack the codes into a wider dtype
        try:
            qweight = from_bnb_state_dict(sd, prefix)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{self.index[prefix].file}: bad 4-bit state for {prefix!r}: {e}") from None
        if qweight.state.quant_type != self.stored_type:  # transformers would build this layer as the config says
            raise ValueError(f"{self.index[prefix].file}: tensor {prefix!r} is {qweight.state.quant_type}, but "
                             f"config.json's quantization_config has bnb_4bit_quant_type {self.stored_type!r}; "
                             f"valid: a config that matches its tensors")
        if tuple(qweight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{self.index[prefix].file}: tensor {prefix!r} has shape {list(qweight.shape)}, but "
                             f"the config needs {list(linear.weight.shape)}")
        _set_module(self.model, module_name,
                    _nf4_linear(qweight, self.take_bias(module_name, linear.out_features), self.compute_dtype))


def _nf4_linear(qweight, bias, compute_dtype) -> nn.Module:
    from nf4lora.nf4.linear import NF4Linear

    return NF4Linear(qweight, bias=bias, compute_dtype=compute_dtype)


def _is_quantized(module: nn.Module) -> bool:
    from nf4lora.nf4 import QuantizedTensor

    return isinstance(getattr(module, "weight", None), QuantizedTensor)


def model_nbytes(model: nn.Module) -> int:
    """Resident bytes of parameters, buffers and 4-bit weights (each shared tensor counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + sum(m.weight.nbytes for m in model.modules() if _is_quantized(m))


def _checkpoint_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """HF-named tensors of `model`: dense parameters and persistent buffers, 4-bit linears in bitsandbytes' keys."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if _is_quantized(module):
            from nf4lora.nf4.state_dict import to_bnb_state_dict

            tensors.update(to_bnb_state_dict(module.weight, f"{prefix}weight"))
        persistent = [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in module._non_persistent_buffers_set]
        local = [*module.named_parameters(recurse=False), *persistent]
        for pname, t in local:
            tensors[prefix + pname] = t
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    _refuse_foreign_tensors(model, tensors)
    return tensors


def _refuse_foreign_tensors(model: Llama, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that a Llama checkpoint of `model.config` has no key for (a LoRA layer's `base_layer` and
    `lora_A`/`lora_B`): written, neither load_model nor transformers could read the checkpoint back. A 4-bit
    weight's bitsandbytes entries (`{key}.absmax`, ...) belong to its `{key}`."""
    with torch.device("meta"):
        known = set(Llama(model.config).state_dict())
    foreign = [key for key in tensors if key not in known and key.partition(".weight.")[0] + ".weight" not in known]
    if foreign:
        raise ValueError(f"the model has {len(foreign)} tensor(s) that a Llama checkpoint has no place for, e.g. "
                         f"{foreign[:3]}; valid: merge the adapters first (merge_and_unload) or save them apart "
                         f"(save_adapter)")


def save_pretrained(model: Llama, out_dir: str, max_shard_bytes: int | None = None) -> None:
    """Write a dense `model` as a Hugging Face directory (config.json + safetensors, sharded above max_shard_bytes)."""
    quantized = [n for n, m in model.named_modules() if _is_quantized(m)]
    if quantized:
        raise ValueError(f"save_pretrained writes dense models; {quantized[0]} is 4-bit: use save_quantized")
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    write_checkpoint(out_dir, _checkpoint_tensors(model), config, max_shard_bytes)


def _skip_modules(model: Llama) -> list[str]:
    """llm_int8_skip_modules for `model`: its dense linears, each by attribute name (e.g. "lm_head") where no 4-bit
    linear's name ends in it (transformers skips every module whose name ends in an entry), else by full name.

    Never None: transformers reads None as "skip my defaults", which include the lm_head even when it is 4-bit.
    """
    quantized = [n for n, m in model.named_modules() if _is_quantized(m)]
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = set()
    for name in dense:
        short = name.rpartition(".")[2]
        names.add(name if any(q.endswith(short) for q in quantized) else short)
    return sorted(names)


def save_quantized(model: Llama, out_dir: str, max_shard_bytes: int | None = None) -> None:
    """Write a 4-bit `model` in transformers + bitsandbytes' format (loadable by `from_pretrained` and by us).

    The 4-bit linears' biases are written in the dtype they are held in (the model's), as transformers writes them."""
    quantized = [m for m in model.modules() if _is_quantized(m)]
    if not quantized:
        raise ValueError("save_quantized needs a 4-bit model (NF4Linear layers); use save_pretrained for dense ones")
    formats = {(m.weight.state.quant_type, m.weight.state.double_quant, m.compute_dtype) for m in quantized}
    if len(formats) > 1:
        raise ValueError(f"mixed 4-bit formats {sorted(map(str, formats))} cannot share one bitsandbytes "
                         f"quantization_config; valid: one (quant_type, double_quant, compute_dtype) for all layers")
    quant_type, double_quant, compute_dtype = formats.pop()
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": _skip_modules(model),
    }
    write_checkpoint(out_dir, _checkpoint_tensors(model), config, max_shard_bytes)
