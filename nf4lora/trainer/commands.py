"""The subcommands besides ``train``: ``generate``, ``merge``, ``quantize`` and ``inspect``.

``merge`` folds the adapter into the base *as it was trained*: the base is loaded in the 4-bit format of the run
that trained ``--adapter`` (its ``run_config.json``; NF4 with double quantization for an adapter from elsewhere),
quantized from the weights cast to the dtype that run trained in, like the trainer loads it, dequantized, and the LoRA update added, so the merged checkpoint reproduces the
adapted model's outputs (up to rounding to the written dtype); ``--quantization none`` merges into the original
full-precision weights instead. ``generate`` loads the base the same way. ``--quantize nf4`` re-quantizes the merged weights into
a bitsandbytes-format 4-bit checkpoint, which rounds the small update against NF4's grid (the lora package warns).

What ``merge`` and ``quantize`` write follows one rule (``written_dtype``): the tensors left unquantized are stored
in ``--dtype``, and a 4-bit checkpoint records it as its compute dtype; ``auto`` writes bf16 on every device. A merge
computes in the dtype that ``auto`` picks for the device (fp32 on a CPU) and rounds once, when it writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from nf4lora.files import publish_directory
from nf4lora.jsonfile import read_json_object

from .config import TrainConfig, UsageError
from .loop import reporting_write
from .job import TORCH_DTYPES, check_directory_path, refuse_inputs_inside, resolve_device, resolve_dtype

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def _load(args: argparse.Namespace, dtype: torch.dtype | None = None,
          run: dict[str, Any] | None = None) -> tuple[torch.nn.Module, torch.device]:
    """The base as --model and the format flags say, in ``dtype`` (default: --dtype resolved for the device).

    A base quantized on load is quantized from the values the run that trained the adapter (``run``, its
    run_config.json) quantized: cast to the dtype it trained in, since the 4-bit codes of a float32 or float16
    checkpoint differ when cast to bf16 first. Then its unquantized tensors are cast to ``dtype``.
    """
    from nf4lora.model import load_model

    device = resolve_device(args.device)
    quantization = None if args.quantization == "none" else args.quantization
    # --dtype is the compute dtype, a pre-quantized checkpoint's too
    dtype = dtype or resolve_dtype(args.dtype, device)
    trained_in = (run or {}).get("resolved_dtype")
    source = TORCH_DTYPES[trained_in] if quantization is not None and trained_in in TORCH_DTYPES else dtype
    model = load_model(args.model, quantization=quantization, dtype=source, device=device, blocksize=args.blocksize,
                       double_quant=args.double_quant, compute_dtype=dtype)
    return model.to(dtype), device  # the 4-bit weights stay as quantized


def written_dtype(name: str) -> torch.dtype:
    """The dtype in which merge and quantize store the tensors they leave unquantized (embeddings, norms, the output
    head), and that a 4-bit checkpoint records as its compute dtype: --dtype ``name``, where auto is bf16 on every
    device, so that one command writes the same checkpoint on a CPU and on a GPU."""
    return torch.bfloat16 if name == "auto" else TORCH_DTYPES[name]


def _store_unquantized_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the float tensors of ``model`` to ``dtype`` (4-bit weights stay packed) and make it the compute dtype
    of its 4-bit layers, which ``save_quantized`` records."""
    from nf4lora.nf4.linear import NF4Linear

    model.to(dtype)
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.compute_dtype = dtype


def _untie_output_head(model: torch.nn.Module) -> None:
    """Give a tied output head its own copy of the embedding matrix before an adapter loads: LoRA on ``lm_head``, or
    either of the two in modules_to_save, makes the adapted model run with two different matrices, and merging
    into the shared one would change the embedding too. ``_tie_if_still_equal`` ties them again after the merge."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


def _tie_if_still_equal(model: torch.nn.Module) -> None:
    """After the merge: head and embedding shared again where they are still equal, else the checkpoint records
    them untied (and stores both), as the adapted model ran."""
    if model.config.tie_word_embeddings:
        if torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
            model.tie_weights()
        else:
            model.config.tie_word_embeddings = False


def _dequantize_linears(model: torch.nn.Module) -> None:
    """Replace each 4-bit layer left in ``model`` (one the adapter does not target, which ``merge_and_unload`` keeps
    as it is) by an ``nn.Linear`` holding its dequantized (out, in) weight in its compute dtype: a dense merge holds
    the whole base it was trained on, dequantized."""
    from nf4lora.nf4.linear import NF4Linear, frozen_linear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NF4Linear):
                setattr(parent, name, frozen_linear(child.dequantized_weight(), child.bias))


def _check_adapter(adapter: str) -> None:
    """Checked before the model loads (minutes for a 7B)."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json there; pass a peft adapter directory "
                         f"(a run directory or one of its checkpoint-<step> directories)")


def _fill_base_format(args: argparse.Namespace, run: dict[str, Any]) -> None:
    """--quantization, --blocksize and --double-quant left unset take the values of ``run``, the settings of the
    nf4lora run that trained --adapter, so that the adapter runs on (and merges into) the base it was trained on;
    else TrainConfig's."""
    for name in ("quantization", "blocksize", "double_quant"):
        if getattr(args, name) is None:
            setattr(args, name, run.get(name, TrainConfig.__dataclass_fields__[name].default))


def _check_output(out: str, overwrite: bool, inputs: tuple[str, ...]) -> Path:
    """Refuse an --out that would lose data, before anything is loaded; nothing is written or removed here.

    Like ``train --output-dir``, --overwrite only ever replaces a model checkpoint (a directory with a config.json),
    never an input of the command nor a directory of something else.
    """
    path = Path(out)
    check_directory_path(path, "--out")
    refuse_inputs_inside(path, "--out", inputs)
    if not path.exists() or not any(path.iterdir()):
        return path
    if not (path / "config.json").is_file():
        raise UsageError(f"--out {path} is not empty and holds no model checkpoint; choose a new directory")
    if not overwrite:
        raise UsageError(f"--out {path} already holds a checkpoint; pass --overwrite to replace it or choose another")
    return path


def _write_checkpoint(out: Path, save: Callable[[str], None], model: str) -> None:
    """``save(dir)`` plus the base's tokenizer files, written next to ``out`` and renamed into place (as the
    trainer's checkpoints are), so ``out`` never holds half a checkpoint and an old one is replaced only by a
    complete one. A write that fails (a full disk) is one TrainingFailed line; one that fails or is interrupted also
    removes the directories above ``out`` that it created."""
    final = out.resolve()
    created = [d for d in (final.parent, *final.parent.parents) if not d.exists()]  # deepest first
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():  # left by a run that was killed mid-write
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with reporting_write("the checkpoint", final.parent, f"--out {out} was left as it was; free space and run "
                                                              f"again"):
            save(str(tmp))
            _copy_tokenizer(model, tmp)
            publish_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            for directory in created:
                with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                    directory.rmdir()


def _copy_tokenizer(model: str, out: Path) -> None:
    from nf4lora.model.checkpoint import resolve_model_dir

    source = Path(resolve_model_dir(model))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return args.prompt
    path = Path(args.prompts_file)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"--prompts-file {path} {state}; pass a .txt (one prompt per line) or .jsonl file")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--prompts-file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    prompts = _parse_prompts(path)
    if not prompts:
        raise UsageError(f"--prompts-file {path} holds no prompts")
    return prompts


def _parse_prompts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        from .data import read_records

        prompts = []
        for record in read_records(path):
            value = record.fields.get("prompt", record.fields.get("instruction"))
            if not isinstance(value, str):
                raise UsageError(f"{record.where}: no string 'prompt' (or 'instruction') field")
            prompts.append(value)
        return prompts
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stream_generate(model: torch.nn.Module, tokenizer: Any, text: str, max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, seed: int, emit: Any) -> list[int]:
    """Decode one prompt (``nf4lora.model.generate_stream``: CUDA-graph steps on one GPU), calling
    ``emit(piece)`` with each new piece of text as it appears. Returns the new token ids (without the EOS that
    stopped it)."""
    from nf4lora.model import generate_stream

    ids = tokenizer.encode(text, bos=True, eos=False)
    stop = tuple(tokenizer.eos_ids or model.config.eos_token_ids)
    new: list[int] = []
    shown = ""
    for token in generate_stream(model, [ids], max_new_tokens, temperature, top_k, top_p, eos_ids=stop, seed=seed):
        if int(token[0]) in stop:
            break
        new.append(int(token[0]))
        decoded = tokenizer.decode(new)
        # A character split over byte tokens decodes to U+FFFD until its last byte arrives: wait for it, since text
        # already emitted cannot be taken back.
        if not decoded.endswith("\ufffd"):
            emit(decoded[len(shown):])
            shown = decoded
    decoded = tokenizer.decode(new)
    if decoded != shown:  # generation stopped inside a character: its replacement marks are the text
        emit(decoded[len(shown):])
    return new


def _run_config(adapter: str | None) -> dict[str, Any]:
    """The resolved settings of the nf4lora run an adapter came from (its run dir or one of its checkpoints), or
    {} for an adapter from elsewhere."""
    if adapter is None:
        return {}
    for directory in (Path(adapter), Path(adapter).parent):
        path = directory / "run_config.json"
        if path.is_file():
            return read_json_object(path)
    return {}


def _training_template(run: dict[str, Any]) -> str | None:
    """The prompt template a run trained with: none for plain-text records, which are trained on as they are."""
    return None if run.get("record_format") == "text" else run.get("template")


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Checked before the model loads (minutes for a 7B), each named by its flag: the sampling flags by the rules
    (and messages) of ``nf4lora.model.generate`` itself."""
    from nf4lora.model.generate import check_sampling_arguments

    check_sampling_arguments(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             as_flags=True)
    if args.template is not None:
        TrainConfig(template=args.template)  # the template rules (and messages) of the run that trains adapters


def generate_command(args: argparse.Namespace) -> int:
    from nf4lora.lora import load_adapter
    from nf4lora.model import load_tokenizer

    _check_generate_flags(args)
    prompts = _read_prompts(args)
    if args.adapter:
        _check_adapter(args.adapter)
    run = _run_config(args.adapter)
    _fill_base_format(args, run)
    template = args.template if args.template is not None else _training_template(run)
    model, _ = _load(args, run=run)
    tokenizer = load_tokenizer(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    for prompt in prompts:
        text = template.format(prompt=prompt) if template else prompt
        print(f">>> {prompt}", flush=True)
        stream_generate(model, tokenizer, text, args.max_new_tokens, args.temperature, args.top_k or None,
                        args.top_p, args.seed, emit=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
    return 0


def merge_command(args: argparse.Namespace) -> int:
    from nf4lora.lora import load_adapter, merge_and_unload
    from nf4lora.model import save_pretrained, save_quantized

    run = _run_config(args.adapter)
    _fill_base_format(args, run)
    requantize = args.quantize == "nf4"
    if requantize and args.quantization != "nf4":
        raise UsageError(f"--quantize nf4 re-quantizes in the format the base was loaded in; pass --quantization nf4 "
                         f"(got {args.quantization})")
    _check_adapter(args.adapter)
    out = _check_output(args.out, args.overwrite, (args.model, args.adapter))
    model, _ = _load(args, run=run)
    _untie_output_head(model)
    load_adapter(model, args.adapter)
    merge_and_unload(model, requantize=requantize)
    _tie_if_still_equal(model)
    if not requantize:
        _dequantize_linears(model)
    dtype = written_dtype(args.dtype)
    _store_unquantized_in(model, dtype)
    save = save_quantized if requantize else save_pretrained
    _write_checkpoint(out, lambda directory: save(model, directory), args.model)
    stored = str(dtype).removeprefix("torch.")
    print(f"merged {f'4-bit NF4 (the rest {stored})' if requantize else stored} checkpoint written to {out}")
    return 0


def quantize_command(args: argparse.Namespace) -> int:
    from nf4lora.model import save_quantized

    if args.quantization == "none":
        raise UsageError("quantize --quantization none would write nothing new; use nf4 or fp4")
    out = _check_output(args.out, args.overwrite, (args.model,))
    model, _ = _load(args, written_dtype(args.dtype))  # quantized from the weights as read in that dtype
    _write_checkpoint(out, lambda directory: save_quantized(model, directory), args.model)
    print(f"{args.quantization.upper()} checkpoint (bitsandbytes format, blocksize {args.blocksize}, double quant "
          f"{'on' if args.double_quant else 'off'}) written to {out}")
    return 0


# ------------------------------------------------------------------------------------------------------ inspect

def quantized_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one 4-bit weight: packed nibbles + absmax (fp32, or uint8 + nested fp32 absmax and an offset).

    The codebooks (16 and 256 floats) are shared constants and not counted.
    """
    blocks = math.ceil(numel / blocksize)
    absmax = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax


def model_report(model_dir: str, blocksize: int) -> dict[str, Any]:
    """Architecture, parameter counts and storage sizes, computed on the meta device (nothing is loaded)."""
    from nf4lora.lora.model import linear_module_names
    from nf4lora.model import Llama, LlamaConfig
    from nf4lora.model.checkpoint import resolve_model_dir
    from nf4lora.model.loading import LoadOptions

    config = LlamaConfig.from_file(resolve_model_dir(model_dir))
    with torch.device("meta"):
        model = Llama(config)
    params = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(params.values())
    targets = linear_module_names(model)
    skipped = LoadOptions().skip_modules  # the loader keeps these (the output head) in the compute dtype
    quantized = {name: params[f"{name}.weight"] for name in targets if name.rpartition(".")[2] not in skipped}
    dense = total - sum(quantized.values())
    linear = {"bf16": 2 * sum(quantized.values())}
    for label, double in (("nf4", False), ("nf4_double_quant", True)):
        linear[label] = sum(quantized_bytes(n, blocksize, double) for n in quantized.values())
    sizes = {label: 2 * dense + nbytes for label, nbytes in linear.items()}
    return {
        "architecture": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings")},
        "rope_scaling": config.rope_scaling,
        "parameters": total, "quantized_parameters": sum(quantized.values()),
        "bytes": sizes, "bytes_per_parameter": {k: v / total for k, v in sizes.items()},
        "linear_bytes_per_parameter": {k: v / max(1, sum(quantized.values())) for k, v in linear.items()},
        "lora_targets": sorted({name.rpartition(".")[2] for name in targets}), "linear_modules": targets,
    }


def inspect_command(args: argparse.Namespace) -> int:
    report = model_report(args.model, args.blocksize)
    if args.json:
        print(json.dumps(report))
        return 0
    arch = report["architecture"]
    print(f"Llama: {arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}, intermediate "
          f"{arch['intermediate_size']}, heads {arch['num_attention_heads']} (kv {arch['num_key_value_heads']}, "
          f"head_dim {arch['head_dim']}), vocab {arch['vocab_size']}, context {arch['max_position_embeddings']}, "
          f"rope theta {arch['rope_theta']:g}"
          f"{', scaling ' + str(report['rope_scaling']) if report['rope_scaling'] else ''}"
          f", {'tied' if arch['tie_word_embeddings'] else 'untied'} embeddings")
    print(f"parameters: {report['parameters']:,} ({report['quantized_parameters']:,} in linear layers that NF4 "
          f"quantizes; embeddings, norms and lm_head stay bf16)")
    print(f"{'format':<22}{'model size':>14}{'bytes/param':>14}{'linear bytes/param':>20}")
    names = {"bf16": "bf16", "nf4": f"nf4 (block {args.blocksize})", "nf4_double_quant": "nf4 + double quant"}
    for key, label in names.items():
        print(f"{label:<22}{report['bytes'][key] / 2**20:>10.1f} MiB{report['bytes_per_parameter'][key]:>14.4f}"
              f"{report['linear_bytes_per_parameter'][key]:>20.4f}")
    print(f"linear modules LoRA can target (--target-modules): {','.join(report['lora_targets'])} "
          f"({len(report['linear_modules'])} modules; all-linear selects all but the output head)")
    return 0
