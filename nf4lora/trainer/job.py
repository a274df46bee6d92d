"""``nf4lora train``: the QLoRA recipe end to end, from a TrainConfig to a run directory.

1. load the base model with NF4 (double-quantized) weights and the compute dtype; 2. prepare it for k-bit training;
3. add LoRA; 4. print the trainable parameters; 5. train with paged AdamW; 6. save the adapter (peft format);
7. load the base model again in 4-bit with the adapter and generate a sample.

Without ``--model`` a small Llama with seeded random weights and a sentencepiece tokenizer trained on the training
texts is generated and written as a Hugging Face directory (``<run>/base_model``: ``config.json``,
``model.safetensors``, ``tokenizer.model``); without ``--data`` the bundled legal-clause dataset is used.

Bad input never leaves a half-written run: the device, the resume checkpoint, the output directory (writable?) and
the model path are checked first, then data, tokenizer, model and LoRA targets are all loaded and checked, before
the run directory is created; the generated base model is built in a temporary directory that is renamed into the
run only then. The run's files are replaced atomically (``nf4lora.files.publish_file``): a crash leaves the previous
version or the new one, never half a file. ``--overwrite`` never loses the old run to a new one that fails: its files
are moved into a hidden ``.replaced-*`` directory inside the run directory when the new run is created there, deleted
once the new run has saved its first checkpoint, and moved back if the new run stops before that (an error, Ctrl-C);
a process killed in between leaves them in that directory. Run directory layout: ``run_config.json``, ``metrics.jsonl``,
``checkpoint-<step>/``, ``adapter_config.json`` + ``adapter_model.safetensors`` (final adapter), ``loss.png``,
``summary.json``, ``base_model/`` (default job only).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nf4lora.files import publish_file

from .checkpoint import (STATE_FILE, Resume, check_compatible, check_resumable, read_resume,
                         restore_training_state, set_rng_state)
from .config import TrainConfig, UsageError
from .corpus import legal_clauses, train_tokenizer
from .data import (DATA_ORDER, BatchPlan, Example, Record, build_examples, detect_format, eval_batches, pack,
                   read_records, split_prompt, split_validation)
from .loop import LoopState, Trainer, lr_lambda
from .metrics import PLOT_FILE, MetricsLog, plot_loss, strict_dumps

RUN_MARKER = "run_config.json"
SUMMARY_FILE = "summary.json"
BASE_DIR = "base_model"
# The embedded default: ~3.7M parameters (vocab 1024), small enough for ~2 minutes of training on 2 CPU cores.
DEFAULT_ARCH = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
                "max_position_embeddings": 1024}
DEFAULT_VOCAB = 1024
BUNDLED_RECORDS = 1200
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------ device and dtype

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype name of ``dtype`` (one of TORCH_DTYPES' values)."""
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it, else fp32 (CPU bf16 matmuls are slower than fp32 on most hosts)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return TORCH_DTYPES[name]


# ------------------------------------------------------------------------------------------- model building

def write_default_base(out_dir: Path, texts: list[str], seed: int) -> Path:
    """A seeded random Llama + a sentencepiece tokenizer fitted on ``texts``, as a Hugging Face directory."""
    from nf4lora.model import Llama, LlamaConfig, save_pretrained

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, out_dir / "tokenizer.model", vocab_size=DEFAULT_VOCAB)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    config = LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **DEFAULT_ARCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(config)
    save_pretrained(model.to(torch.bfloat16), str(out_dir))
    return out_dir


def prepare_for_kbit_training(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """Freeze the base and set it up for adapter training on quantized weights.

    Unlike peft's version this casts nothing to float32: embeddings and the head stay in the compute dtype (a
    float32 copy of a 32k x 4096 embedding is 512 MiB for nothing). Where precision matters the math is already
    float32: RMSNorm normalizes in float32, the loss is computed from float32 logits, LoRA weights and optimizer
    states are float32. The embedding output is marked as requiring grad so that checkpointed layers (reentrant
    or not) always have a differentiable input.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    model.gradient_checkpointing = gradient_checkpointing
    return model


def lora_config(config: TrainConfig) -> Any:
    from nf4lora.lora import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=config.target_modules_value(),
                      lora_dropout=config.lora_dropout, use_rslora=config.use_rslora, use_dora=config.use_dora)


def _inject(model: torch.nn.Module, config: TrainConfig) -> None:
    """inject_lora, with a one-line error that lists the valid layer names once (not every module path)."""
    from nf4lora.lora import inject_lora
    from nf4lora.lora.model import linear_module_names

    try:
        inject_lora(model, lora_config(config))
    except ValueError as exc:
        names = ",".join(sorted({name.rpartition(".")[2] for name in linear_module_names(model)}))
        raise UsageError(f"--target-modules {config.target_modules}: {str(exc).split(';')[0]}; valid names: "
                         f"{names}, or all-linear") from None


def load_base(model_dir: str, config: TrainConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base model with NF4/FP4 (or unquantized) linear weights and ``dtype`` compute, also for a pre-quantized
    checkpoint whose quantization_config names another compute dtype (``--dtype`` decides)."""
    from nf4lora.model import load_model

    quantization = None if config.quantization == "none" else config.quantization
    return load_model(model_dir, quantization=quantization, dtype=dtype, device=device,
                      blocksize=config.blocksize, double_quant=config.double_quant, compute_dtype=dtype)


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from nf4lora.optim import AdamW, PagedAdamW

    bits = 8 if config.optimizer.endswith("8bit") else 32
    kind = PagedAdamW if config.optimizer.startswith("paged") else AdamW
    return kind(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay,
                optim_bits=bits)


# --------------------------------------------------------------------------------------------------- the run

@dataclass
class Prepared:
    """Everything loaded and validated before the run directory is touched."""

    run_dir: Path
    model_dir: Path
    generated_base: Path | None
    model: torch.nn.Module
    tokenizer: Any
    plan: BatchPlan
    val_rows: list[Example]
    sample: tuple[str, str | None] | None
    total_steps: int
    total_micro_batches: int
    device: torch.device
    resume_state: dict[str, Any] | None
    resume_from: Path | None
    dropped: int
    record_format: str  # the detected one, never "auto"
    val_dropped: int = 0  # validation examples that --max-len left without response tokens: eval skips them
    replaced: Path | None = None  # where --overwrite moved the old run's files until the new run's first checkpoint


def run_length(config: TrainConfig, per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches) of the run. ``--epochs`` counts micro-batches, so the run ends where the
    epochs do and its last step may take fewer than ``grad_accum`` of them."""
    if config.max_steps:
        return config.max_steps, config.max_steps * config.grad_accum
    exact = config.epochs * per_epoch
    if not math.isfinite(exact):
        raise UsageError(f"--epochs {config.epochs:g} of {per_epoch} micro-batches each overflows a float; use at "
                         f"most {sys.float_info.max / per_epoch:g}, or --max-steps")
    # Rounded first: 1.1 * 50 is 55.00000000000001 in floats, which must not become a 56th micro-batch.
    micro_batches = max(1, math.ceil(round(exact, 9)))
    return math.ceil(micro_batches / config.grad_accum), micro_batches


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _outermost_missing(path: Path) -> Path | None:
    """The first directory that ``path.mkdir(parents=True)`` would create, or None when ``path`` exists."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[-1] if missing else None


def check_directory_path(path: Path, flag: str) -> None:
    """Refuse an output directory ``path`` that is, or lies below, a file, or that could not be created or written
    in: checked before anything loads, as the writes that would fail run only once everything has. (os.access
    answers for root too: yes, except on a read-only file system.)"""
    blocker = _nearest_existing(path)
    if not blocker.is_dir():
        raise UsageError(f"{flag} {path}: {blocker} is a file; pass a directory path")
    if not os.access(blocker, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {blocker} is not writable; choose another {flag}")


def _resumes_in_place(run_dir: Path, resume_from: Path | None) -> bool:
    return resume_from is not None and resume_from.parent.resolve() == run_dir.resolve()


def refuse_inputs_inside(path: Path, flag: str, inputs) -> None:
    """Refuse an output directory ``path`` (given as ``flag``) that is, or holds, one of the existing ``inputs``:
    replacing what it holds would remove or move them away."""
    for source in map(Path, inputs):
        if source.exists() and path.resolve() in (source.resolve(), *source.resolve().parents):
            raise UsageError(f"{flag} {path} holds the input {source}; choose another directory")


def _check_run_dir(run_dir: Path, config: TrainConfig, resume_from: Path | None) -> None:
    check_directory_path(run_dir, "--output-dir")
    if _resumes_in_place(run_dir, resume_from):
        return
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (run_dir / RUN_MARKER).exists():
        raise UsageError(f"--output-dir {run_dir} is not empty and holds no nf4lora run; choose a new directory")
    if not config.overwrite:
        raise UsageError(f"--output-dir {run_dir} already holds a run; pass --overwrite to replace it, "
                         f"--resume {run_dir} to continue it, or choose another --output-dir")
    # --overwrite moves the old run's files aside, and with them any input of this run that they hold
    inputs = (config.model, config.data, config.val_data, resume_from)
    refuse_inputs_inside(run_dir, "--output-dir", [i for i in inputs if i is not None])


def _load_records(config: TrainConfig) -> tuple[list[Record], list[Record]]:
    if config.data is None:
        records = [Record(r, f"bundled record {i}") for i, r in enumerate(legal_clauses(BUNDLED_RECORDS))]
    else:
        records = read_records(config.data)
    if config.val_data is not None:
        return records, read_records(config.val_data)
    return split_validation(records, config.val_fraction, config.seed)


def _check_model(model: str) -> None:
    """Refuse a ``--model`` that is an nf4lora run or checkpoint rather than its base model, or that does not exist
    (the model loader's own check, which for a hub id fetches only its config.json)."""
    from nf4lora.model.checkpoint import resolve_model_dir

    path = Path(model)
    run = path.parent if (path / STATE_FILE).is_file() else path
    if (run / RUN_MARKER).is_file():
        what = "an nf4lora run directory" if run == path else f"a checkpoint of the nf4lora run {run}"
        raise UsageError(f"--model {model} is {what}, not a base model; pass the base model it trained: "
                         f"--model {_trained_base(run)}")
    resolve_model_dir(model, ("config.json",))


def _trained_base(run: Path) -> str:
    """The base model of a run: its generated ``base_model/``, else the model its run_config.json records."""
    from nf4lora.jsonfile import read_json_object

    if (run / BASE_DIR).is_dir():
        return str(run / BASE_DIR)
    return str(read_json_object(run / RUN_MARKER).get("resolved_model", f"the resolved_model of {run / RUN_MARKER}"))


def _check_resume_step(config: TrainConfig, resume_from: Path | None, state: dict[str, Any] | None,
                       total_steps: int) -> None:
    """Refuse to resume a run at or past its last step: it would train nothing and report success."""
    if state is None or state["step"] < total_steps:
        return
    flag, value = ("--max-steps", config.max_steps) if config.max_steps else ("--epochs", config.epochs)
    raise UsageError(f"--resume {resume_from}: the checkpoint is at step {state['step']} and this run ends at step "
                     f"{total_steps}; raise {flag} (now {value}) to train further")


def _check_eval_data(config: TrainConfig, val_records: list[Record], val_dropped: int) -> None:
    """Refuse an ``--eval-steps`` set by the user when the run has no evaluation data, where it would silently never
    evaluate. The demo's default (None) asks for evaluations only where there is data."""
    if not config.eval_steps or len(val_records) > val_dropped:
        return
    if val_records:
        why = f"--max-len {config.max_len} leaves all {val_dropped} validation examples without response tokens"
    elif config.val_fraction > 0:
        why = f"--data holds too few records to split --val-fraction {config.val_fraction:g} off"
    else:
        why = "--val-fraction is 0 and there is no --val-data"
    raise UsageError(f"--eval-steps {config.eval_steps} asks for evaluations, but the run has no evaluation data "
                     f"({why}); pass --val-data FILE or a --val-fraction above 0, or --eval-steps 0")


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Token ids of a text piece without BOS/EOS (the example builder adds those itself)."""
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


def prepare(config: TrainConfig, resume: Resume | None = None) -> Prepared:
    """Load and check everything; raises UsageError (or ValueError from a loader) before writing anything. The
    quick checks (device, resume checkpoint, output directory, model path) run before the data is read and the base
    is built or loaded, which takes minutes for a 7B model. ``resume``: the checkpoint ``config.resume`` names,
    already read by the caller (the CLI, for its saved config), so that its files are read and hashed once; without
    it the checkpoint is read here."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # LoRA init and dropout; a resumed run restores the RNG from its checkpoint
    if resume is None and config.resume is not None:
        resume = read_resume(config.resume)
    assert (resume is None) == (config.resume is None), "resume is the checkpoint that config.resume names"
    resume_from = resume_state = None
    if resume is not None:
        resume_from, resume_state = resume.checkpoint, resume.state
        check_compatible(config, resume_state, resume_from)
        check_resumable(resume_from, resume_state)
    run_dir = Path(config.output_dir) if config.output_dir else (
        resume_from.parent if resume_from is not None else _default_run_dir())
    _check_run_dir(run_dir, config, resume_from)
    if config.model is not None:
        _check_model(config.model)

    train_records, val_records = _load_records(config)
    record_format = detect_format(train_records, config.record_format)
    if val_records:
        detect_format(val_records, record_format)

    generated = None
    try:
        if config.model is not None:
            model_dir = Path(config.model)
        elif resume_from is not None and (resume_from.parent / BASE_DIR / "config.json").is_file():
            model_dir = resume_from.parent / BASE_DIR
        else:
            # Next to the run, on its file system for the rename, but in a directory that exists already: the
            # parents of the run directory are made only once every check has passed.
            generated = Path(tempfile.mkdtemp(prefix=".base_model-", dir=_nearest_existing(run_dir.parent)))
            texts = [" ".join(t for t in split_prompt(r, record_format) if t) for r in train_records]
            model_dir = write_default_base(generated, texts, config.seed)

        from nf4lora.model import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
        encode = _encoder(tokenizer)
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        if eos is None:  # every example ends with it
            raise UsageError(f"{model_dir}: the tokenizer has no EOS token; valid: an eos_token in "
                             f"tokenizer_config.json or an eos_token_id in generation_config.json")
        pad = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else eos
        rows, dropped = build_examples(train_records, record_format, encode, bos, eos, config.template, config.max_len)
        val_rows, val_dropped = build_examples(val_records, record_format, encode, bos, eos, config.template,
                                               config.max_len)
        if dropped == len(train_records):
            raise UsageError(f"all {dropped} training examples lose every response token to --max-len "
                             f"{config.max_len}; raise --max-len")
        _check_eval_data(config, val_records, val_dropped)
        if config.packing:
            rows, val_rows = pack(rows, config.max_len), pack(val_rows, config.max_len)
        # a checkpoint saved before the order had versions was trained on version 1's
        order = DATA_ORDER if resume_state is None else resume_state.get("data_order", 1)
        plan = BatchPlan(rows, config.micro_batch, config.seed, pad, config.packing, order)
        total_steps, total_micro_batches = run_length(config, plan.per_epoch)
        config.check_warmup(total_steps)
        _check_resume_step(config, resume_from, resume_state, total_steps)

        model = load_base(str(model_dir), config, device, resolve_dtype(config.dtype, device))
        prepare_for_kbit_training(model, config.gradient_checkpointing)
        from nf4lora.lora import load_adapter

        if resume_from is not None:  # check_compatible guarantees the saved adapter has this run's LoRA settings
            load_adapter(model, str(resume_from))
        else:
            _inject(model, config)
    except BaseException:
        if generated is not None:
            shutil.rmtree(generated, ignore_errors=True)
        raise
    sample = None
    if config.sample_prompt is not None:
        sample = (config.sample_prompt, None)
    elif val_records and record_format != "text":
        sample = split_prompt(val_records[0], record_format)
    return Prepared(run_dir, model_dir, generated, model, tokenizer, plan,
                    val_rows, sample, total_steps, total_micro_batches, device, resume_state, resume_from, dropped,
                    record_format, val_dropped)


def _create_run_dir(p: Prepared, config: TrainConfig) -> None:
    """The only place a run directory is created or its old run moved aside (--overwrite), after every check has
    passed. When it cannot be written (permissions, a full disk) it is a one-line UsageError, and the directories
    made for it are removed."""
    made = _outermost_missing(p.run_dir)
    try:
        _fill_run_dir(p, config)
    except BaseException as exc:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UsageError(f"--output-dir {p.run_dir}: cannot write {exc.filename or p.run_dir} "
                             f"({exc.strerror or exc}); choose another --output-dir") from None
        raise


def _fill_run_dir(p: Prepared, config: TrainConfig) -> None:
    replacing = config.overwrite and not _resumes_in_place(p.run_dir, p.resume_from)
    if replacing and p.run_dir.is_dir() and any(p.run_dir.iterdir()):
        _move_old_run_aside(p)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    if p.generated_base is not None:
        target = p.run_dir / BASE_DIR
        if target.exists():
            shutil.rmtree(target)
        p.generated_base.rename(target)
        p.model_dir, p.generated_base = target, None
    resolved = config.to_dict()
    resolved["resolved_model"] = str(p.model_dir)
    # the detected format, so that generate knows whether training wrapped prompts in the template
    resolved["record_format"] = p.record_format
    # the dtype the base was cast to before it was quantized: its 4-bit codes depend on it, so merge and generate
    # quantize the base from the same values
    resolved["resolved_dtype"] = dtype_name(resolve_dtype(config.dtype, p.device))
    publish_file(p.run_dir / RUN_MARKER, (json.dumps(resolved, indent=2) + "\n").encode("utf-8"))


def _move_old_run_aside(p: Prepared) -> None:
    """Move the files of the run that --overwrite replaces into a new hidden directory inside the run directory,
    ``p.replaced`` once all are there. The files move rather than the directory itself, which may be a mount point
    or the working directory; each move is a rename within one file system."""
    replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=p.run_dir))
    try:
        _move_children(p.run_dir, replaced)
    except BaseException:  # Ctrl-C among the renames: the moved files go back, so the run stays whole
        _move_children(replaced, p.run_dir)
        replaced.rmdir()
        raise
    p.replaced = replaced


def _move_children(source: Path, target: Path) -> None:
    for child in list(source.iterdir()):
        if child != target:
            os.replace(child, target / child.name)


def _drop_replaced_run(p: Prepared) -> None:
    """The new run holds a checkpoint: the run it replaces goes."""
    replaced, p.replaced = p.replaced, None
    if replaced is not None:
        shutil.rmtree(replaced)


def _restore_replaced_run(p: Prepared) -> None:
    """The new run stopped before its first checkpoint: its files go and the replaced run's come back."""
    replaced, p.replaced = p.replaced, None
    for child in list(p.run_dir.iterdir()):
        if child != replaced:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    _move_children(replaced, p.run_dir)
    replaced.rmdir()


def _start(p: Prepared, config: TrainConfig, on_step: Callable[[Trainer, dict[str, Any]], None] | None,
           log: Callable[[str], None]) -> Trainer:
    """Optimizer, schedule and loss scaler (restored on resume), then the run directory, then the Trainer."""
    from nf4lora.lora import print_trainable_parameters, save_adapter

    model = p.model
    print_trainable_parameters(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = make_optimizer(config, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.warmup_steps, p.total_steps))
    state = LoopState()
    fp16 = resolve_dtype(config.dtype, p.device) == torch.float16
    scaler = torch.amp.GradScaler(p.device.type) if fp16 else None
    if p.resume_state is not None:
        restore_training_state(p.resume_from, p.resume_state, optimizer, scheduler, scaler)
        state = LoopState(step=p.resume_state["step"], tokens=p.resume_state["tokens"],
                          elapsed_s=p.resume_state["elapsed_s"])
    _create_run_dir(p, config)
    if p.resume_state is not None:
        set_rng_state(p.resume_state["rng"])
        log(f"resuming from {p.resume_from} at step {state.step}")
    if p.dropped:
        log(f"note: {p.dropped} examples dropped because --max-len {config.max_len} left no response tokens")
    if p.val_dropped:
        covers = "the rest" if p.val_rows else "none: there is no evaluation"
        log(f"note: {p.val_dropped} validation examples dropped because --max-len {config.max_len} left no response "
            f"tokens; eval_loss covers {covers}")
    val = eval_batches(p.val_rows, config.micro_batch, p.plan.pad_id, config.packing)

    def write_adapter(directory: Path) -> None:
        save_adapter(model, str(directory), base_model_name_or_path=str(p.model_dir))

    return Trainer(config, model, optimizer, scheduler, p.plan, p.total_steps, p.run_dir, p.device, write_adapter,
                   val_batches=val, total_micro_batches=p.total_micro_batches, state=state, on_step=on_step,
                   last_checkpoint=p.resume_from, scaler=scaler, on_checkpoint=lambda _: _drop_replaced_run(p))


def run_train(config: TrainConfig, on_step: Callable[[Trainer, dict[str, Any]], None] | None = None,
              log: Callable[[str], None] = print, resume: Resume | None = None) -> dict[str, Any]:
    """Run the whole job; returns the summary (also written to ``summary.json``). ``resume``: see :func:`prepare`."""
    p = prepare(config, resume)
    try:
        return _run(p, config, on_step, log)
    finally:
        if p.generated_base is not None:  # not yet renamed into the run: a step before that failed
            shutil.rmtree(p.generated_base, ignore_errors=True)
        if p.replaced is not None:
            _restore_replaced_run(p)


def _run(p: Prepared, config: TrainConfig, on_step: Callable[[Trainer, dict[str, Any]], None] | None,
         log: Callable[[str], None]) -> dict[str, Any]:
    trainer = _start(p, config, on_step, log)
    metrics = MetricsLog(p.run_dir, resume_step=trainer.state.step if p.resume_state is not None else None)
    try:
        summary = trainer.run(metrics)
    finally:
        metrics.close()
    summary["run_dir"] = str(p.run_dir)
    summary["base_model"] = str(p.model_dir)
    finished = None
    if summary["interrupted"]:
        log(f"stopped at step {summary['steps']}/{p.total_steps}; checkpoint {summary['checkpoint']}; continue with "
            f"--resume {p.run_dir}")
    else:
        finished = f"training finished and {trainer.last_checkpoint} holds the final adapter"
        with trainer.writing("the final adapter", then=finished):
            trainer.save_adapter(p.run_dir)  # each file replaces its old copy in one rename, weights first
        summary["adapter"] = str(p.run_dir)
        with trainer.writing(PLOT_FILE, then=finished):
            plot = plot_loss(p.run_dir)
        summary["loss_plot"] = str(plot) if plot else None
        if p.sample is not None and config.max_new_tokens > 0:
            summary["sample"] = _sample(p, config)
    with trainer.writing(SUMMARY_FILE, then=finished):
        publish_file(p.run_dir / SUMMARY_FILE, (strict_dumps(summary, indent=2) + "\n").encode("utf-8"))
    _print_summary(summary, log)
    return summary


def _sample(p: Prepared, config: TrainConfig) -> dict[str, Any]:
    """Step 7 of the recipe: a fresh 4-bit base + the saved adapter, greedy generation from a held-out prompt."""
    from nf4lora.lora import load_adapter
    from nf4lora.model import generate

    prompt, reference = p.sample
    model = load_base(str(p.model_dir), config, p.device, resolve_dtype(config.dtype, p.device))
    load_adapter(model, str(p.run_dir))
    model.eval()
    text = prompt if p.record_format == "text" else config.template.format(prompt=prompt)  # as trained
    prompt_ids = p.tokenizer.encode(text, bos=True, eos=False)
    out = generate(model, [prompt_ids], max_new_tokens=config.max_new_tokens, temperature=0.0,
                   eos_ids=p.tokenizer.eos_ids or None, seed=config.seed)
    completion = p.tokenizer.decode(out[0, len(prompt_ids):].tolist())
    return {"prompt": prompt, "completion": completion, "reference": reference}


def _print_summary(summary: dict[str, Any], log: Callable[[str], None]) -> None:
    log("")
    if summary["first_loss"] is not None:
        log(f"train loss {summary['first_loss']:.4f} at step {summary['first_step']} -> {summary['last_loss']:.4f} "
            f"at step {summary['steps']} ({summary['tokens']:,} tokens in {summary['train_seconds']:.1f} s of "
            f"training, {summary['tokens_per_s']:.0f} tokens/s)")
    if summary.get("eval"):
        log(f"eval loss {summary['eval']['eval_loss']:.4f}, perplexity {summary['eval']['eval_ppl']:.2f} "
            f"(step {summary['eval']['step']})")
    if summary.get("sample"):
        s = summary["sample"]
        log(f"sample prompt:     {s['prompt']}")
        log(f"sample completion: {s['completion'].strip()}")
        if s["reference"] is not None:
            log(f"reference:         {s['reference']}")
    log(f"run directory:  {summary['run_dir']}")
    log(f"base model:     {summary['base_model']}")
    if summary.get("adapter"):
        log(f"adapter:        {summary['adapter']} (adapter_config.json + adapter_model.safetensors)")
    log(f"metrics:        {Path(summary['run_dir']) / 'metrics.jsonl'}")
    if summary.get("loss_plot"):
        log(f"loss curve:     {summary['loss_plot']}")
    elif not summary["interrupted"]:
        log("loss curve:     skipped (pip install matplotlib for loss.png)")
