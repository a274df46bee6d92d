"""Training configuration: one typed dataclass, mapped 1:1 to kebab-case flags and to TOML keys.

Precedence, lowest first: the dataclass defaults, then ``--config file.toml``, then explicit flags. Every field
``foo_bar`` is the flag ``--foo-bar`` and the TOML key ``foo_bar`` (``foo-bar`` is accepted too). Booleans get
``--x`` / ``--no-x``. ``TrainConfig`` validates itself on creation and raises :class:`UsageError`, a ``ValueError``
whose one-line message names the bad value and what would have been valid; the CLI prints it and exits with code 2.
The resolved config is written into every run directory and every checkpoint (``TrainConfig.to_dict``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("paged-adamw-32bit", "paged-adamw-8bit", "adamw-32bit", "adamw-8bit")
QUANTIZATIONS = ("nf4", "fp4", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
RECORD_FORMATS = ("auto", "text", "prompt-completion", "instruction")
DEVICES = ("auto", "cpu", "cuda")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SEED_LIMIT = 2**63  # torch.Generator takes seeds below 2**64, and version-1 data orders seed epoch e with seed + e
DEFAULT_TEMPLATE = "### Clause:\n{prompt}\n\n### Summary:\n"

# The embedded demo (neither --model nor --data) adapts a small *random* base, which wants a higher learning rate
# and more steps than fine-tuning a pretrained 7B does; explicit flags and TOML keys still win over these.
DEMO_DEFAULTS = {"lr": 1e-3, "micro_batch": 8, "epochs": 1.5, "schedule": "cosine", "warmup_steps": 10,
                 "eval_steps": 50}

# Fields that fix the shape of the trainable state: a checkpoint is only resumable when these agree.
RESUME_KEYS = ("model", "quantization", "blocksize", "double_quant", "lora_r", "lora_alpha", "target_modules",
               "use_rslora", "use_dora", "optimizer", "micro_batch", "grad_accum", "max_len", "packing", "seed",
               "data", "val_data", "val_fraction", "record_format", "template")


# Free text that is tokenized (or matched against module names), so it must be encodable as UTF-8: a command line
# holding bytes that are not UTF-8 reaches Python as lone surrogates, which the tokenizer cannot take.
TEXT_FIELDS = ("template", "sample_prompt", "target_modules")
# An empty path would be read as "." (or, for --output-dir, as no flag at all).
PATH_FIELDS = ("model", "data", "val_data", "output_dir", "resume")


class UsageError(ValueError):
    """A problem with the user's input; the CLI prints the one-line message and exits with code 2."""


def _opt(default: Any, help: str, choices: tuple | None = None, **extra: Any) -> Any:
    meta = {"help": help, "choices": choices, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything ``nf4lora train`` does. ``model``/``data`` left as None select the embedded default job."""

    # Model and data
    model: str | None = _opt(None, "base model: a Hugging Face directory or hub id (default: generate a small "
                                   "random Llama next to the run)")
    data: str | None = _opt(None, "training data: .jsonl/.json/.txt/.csv/.parquet (default: the bundled generated "
                                  "legal-clause dataset)")
    val_data: str | None = _opt(None, "validation data, same formats (default: split --val-fraction off --data)")
    val_fraction: float = _opt(0.05, "fraction of --data held out for validation when --val-data is not given")
    record_format: str = _opt("auto", "record format; auto detects text / prompt+completion / "
                                      "instruction+input+output", RECORD_FORMATS)
    template: str = _opt(DEFAULT_TEMPLATE, "prompt template; {prompt} is the prompt (or instruction + input); "
                                           "its tokens are masked out of the loss")
    max_len: int = _opt(256, "maximum tokens per sequence; longer examples are truncated")
    packing: bool = _opt(False, "pack several short examples per sequence, attention kept within each example")
    output_dir: str | None = _opt(None, "run directory (default: the run directory of --resume, else "
                                        "runs/<timestamp>)")
    overwrite: bool = _opt(False, "replace the run that --output-dir holds; its files are kept aside (in a hidden "
                                  ".replaced-* directory there) until the new run saves its first checkpoint, and "
                                  "put back if it stops before that")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: float = _opt(32.0, "LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input, in [0, 1)")
    target_modules: str = _opt("all-linear", "comma-separated module name suffixes, a regex, or all-linear "
                                             "(every linear layer except the head)")
    use_rslora: bool = _opt(False, "rank-stabilized scaling alpha / sqrt(r)")
    use_dora: bool = _opt(False, "weight-decomposed LoRA (DoRA)")
    # Quantization
    quantization: str = _opt("nf4", "base weight format", QUANTIZATIONS)
    blocksize: int = _opt(64, "quantization blocksize", BLOCKSIZES)
    double_quant: bool = _opt(True, "quantize the absmax constants too (QLoRA double quantization)")
    dtype: str = _opt("auto", "compute dtype; auto = bf16 on a GPU that supports it, else fp32", DTYPES)
    device: str = _opt("auto", "where to train", DEVICES)
    # Schedule and optimizer
    max_steps: int = _opt(0, "optimizer steps to run; 0 = derive from --epochs")
    epochs: float = _opt(1.0, "passes over the training data when --max-steps is 0")
    micro_batch: int = _opt(4, "sequences per forward/backward")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate")
    schedule: str = _opt("constant", "learning-rate schedule after warmup", SCHEDULES)
    warmup_steps: int = _opt(
        0, "linear warmup steps: step s (from 0) of W uses lr * (s + 1) / (W + 1), then the schedule")
    weight_decay: float = _opt(0.0, "decoupled weight decay")
    max_grad_norm: float = _opt(0.3, "gradient clipping norm (0 disables); 0.3 as in QLoRA")
    optimizer: str = _opt("paged-adamw-32bit", "optimizer", OPTIMIZERS)
    gradient_checkpointing: bool = _opt(True, "recompute decoder layers in backward to save activation memory")
    seed: int = _opt(42, "seed for weights, data order, dropout and sampling")
    # Checkpoints, evaluation, logging
    save_steps: int = _opt(0, "write a checkpoint every N optimizer steps (0: only at the end)")
    # None (never a flag or TOML value): the demo's default, DEMO_DEFAULTS' interval where there is evaluation data
    eval_steps: int | None = _opt(0, "evaluate every N optimizer steps (0: only at the end); N > 0 needs evaluation "
                                     "data")
    logging_steps: int = _opt(1, "write a metrics line every N optimizer steps")
    resume: str | None = _opt(None, "resume exactly from a checkpoint directory, or from the latest checkpoint "
                                    "in a run directory")
    progress: bool = _opt(True, "show a progress bar (tqdm when installed)")
    # Sample generation after training
    sample_prompt: str | None = _opt(None, "prompt for the sample generated at the end (default: a held-out "
                                           "example)")
    max_new_tokens: int = _opt(48, "tokens generated for the sample at the end (0 skips the sample)")

    def __post_init__(self) -> None:
        for name, f in _fields().items():
            setattr(self, name, _coerce(name, getattr(self, name), "TrainConfig"))
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, name) not in choices:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)!r} is not valid; use one of "
                                 f"{', '.join(map(str, choices))}")
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{_flag(name)} {value} is not a finite number")
        if self.lora_r <= 0:
            raise UsageError(f"--lora-r {self.lora_r} must be a positive integer (e.g. 8, 16, 64)")
        if self.lora_alpha <= 0:
            raise UsageError(f"--lora-alpha {self.lora_alpha} must be > 0 (e.g. 2 * r)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        positive = {"max_len": 2, "micro_batch": 1, "grad_accum": 1, "logging_steps": 1}
        for name, low in positive.items():
            if getattr(self, name) < low:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)} must be >= {low}")
        for name in ("max_steps", "save_steps", "eval_steps", "warmup_steps", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)} must be >= 0")
        if self.max_steps == 0 and self.epochs <= 0:
            raise UsageError(f"--epochs {self.epochs} must be > 0 when --max-steps is 0")
        if self.max_steps:
            self.check_warmup(self.max_steps)
        if not 0 <= self.seed < SEED_LIMIT:
            raise UsageError(f"--seed {self.seed} must be in [0, 2**63)")
        if self.lr <= 0:
            raise UsageError(f"--lr {self.lr} must be > 0")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)} must be >= 0")
        for name in TEXT_FIELDS:
            _check_unicode(name, getattr(self, name))
        for name in PATH_FIELDS:
            if getattr(self, name) == "":
                raise UsageError(f"--{_flag(name)} '' is empty; pass a path, or leave the flag out for its default")
        self._check_template()
        if not self.target_modules.strip():
            raise UsageError("--target-modules is empty; use all-linear or names such as q_proj,v_proj")

    def _check_template(self) -> None:
        """``{prompt}`` (with a conversion or format spec) is the one placeholder: ``{prompt.x}`` or ``{prompt[0]}``
        would reach into the prompt string, and ``{prompt.upper}`` fill in a method's repr."""
        only = "{prompt} is its only placeholder, and a literal brace is written twice"
        try:
            self.template.format(prompt="")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            raise UsageError(f"--template {self.template!r} cannot be filled in ({type(exc).__name__}: {exc}); "
                             f"{only}") from None
        # Parsed, not searched: "{{prompt}}" is the literal text {prompt}, and "{prompt!s}" is a placeholder.
        names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        others = sorted(names - {"prompt"})
        if others:
            raise UsageError(f"--template {self.template!r} has the placeholder {{{others[0]}}}; {only}")
        if "prompt" not in names:
            raise UsageError(f"--template {self.template!r} must contain the placeholder {{prompt}}")

    def check_warmup(self, total_steps: int) -> None:
        """Refuse a warmup longer than the run, once the run's length in optimizer steps is known."""
        if self.warmup_steps > total_steps:
            length = f"--max-steps {self.max_steps}" if self.max_steps else f"--epochs {self.epochs}"
            raise UsageError(f"--warmup-steps {self.warmup_steps} must be in [0, {total_steps}], the run's "
                             f"{total_steps} optimizer steps ({length})")

    def eval_interval(self) -> int:
        """Optimizer steps between evaluations (0: only at the end). ``eval_steps`` None is the demo's default, every
        ``DEMO_DEFAULTS["eval_steps"]`` steps, which a run without evaluation data ignores where it refuses a value
        the user set."""
        return DEMO_DEFAULTS["eval_steps"] if self.eval_steps is None else self.eval_steps

    def target_modules_value(self) -> str | list[str]:
        """``all-linear``, a regex (kept as one string), or a list of name suffixes."""
        spec = self.target_modules.strip()
        if spec == "all-linear" or any(c in spec for c in "^$*+?()[]|\\"):
            return spec
        return [name.strip() for name in spec.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping of snake_case (or kebab-case) keys; unknown keys are an error naming the source."""
        known = _fields()
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UsageError(f"{source}: unknown key {key!r}; valid keys are {', '.join(known)}")
            clean[name] = _coerce(name, value, source)
        return cls(**clean)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_unicode(name: str, value: str | None) -> None:
    """Refuse text that is not valid Unicode (lone surrogates: bytes that were not UTF-8), naming its first bad
    character."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"--{_flag(name)} {value!r} is not UTF-8 text (character {exc.start} is "
                         f"{value[exc.start]!r}); pass UTF-8 text") from None


def _kind(name: str) -> type:
    """The scalar type of a field, read from its annotation string (``from __future__`` keeps them as text)."""
    annotation = str(_fields()[name].type)
    for kind in (bool, int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str


_KIND_NAMES = {bool: "a bool", int: "an int", float: "a float", str: "a string"}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _kind(name)
    if value is None and "None" in str(_fields()[name].type):
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (list, tuple)) and name == "target_modules":
        return ",".join(map(str, value))
    if kind is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise UsageError(f"{source}: {name} = {value!r} should be {_KIND_NAMES[kind]}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (a flat table, or the same keys under a ``[train]`` table)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; pass a TOML file with TrainConfig keys")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: invalid TOML ({exc})") from None
    return _snake_case_keys(_train_table(values, path), path)


def _train_table(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``[train]`` table when there is one, else the whole file."""
    if "train" not in values:
        return values
    if not isinstance(values["train"], dict):
        raise UsageError(f"--config {path}: train = {values['train']!r} should be a table of TrainConfig keys")
    outside = [key for key in values if key != "train"]
    if outside:
        raise UsageError(f"--config {path}: key {outside[0]!r} lies outside the [train] table; move it into [train]")
    return values["train"]


def _snake_case_keys(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """``foo-bar`` -> ``foo_bar``, refusing a key given in both spellings."""
    spelled: dict[str, str] = {}
    for key in values:
        name = key.replace("-", "_")
        if name in spelled:
            raise UsageError(f"--config {path}: {spelled[name]!r} and {key!r} both set {name}; keep one")
        spelled[name] = key
    return {name: values[key] for name, key in spelled.items()}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaults suppressed so that only explicit flags override the TOML."""
    parser.add_argument("--config", help="TOML file with the same keys as the flags (flags win)")
    for name, f in _fields().items():
        kind = _kind(name)
        flag = f"--{_flag(name)}"
        # a help that explains its own default (what None stands for) is not followed by "(default: None)"
        stated = "(default: " in f.metadata["help"]
        help_text = f.metadata["help"] if stated else f"{f.metadata['help']} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices, help=help_text,
                                metavar=None if choices else kind.__name__.upper())


def config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < ``DEMO_DEFAULTS`` (neither model nor data given) or a resumed run's ``saved`` config < --config
    TOML < explicit flags."""
    values: dict[str, Any] = {}
    source = "flags"
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
        source = f"--config {args.config}"
    values.update({name: getattr(args, name) for name in _fields() if hasattr(args, name)})
    if saved is not None:
        # The checkpoint's own location decides the run directory, so a moved run still resumes in place.
        base = {k: v for k, v in saved.items() if k in _fields() and k not in ("resume", "overwrite", "output_dir")}
        values = {**base, **values}
    elif values.get("model") is None and values.get("data") is None:
        # eval_steps None: the demo's interval, unlike one the user sets, needs no evaluation data (eval_interval)
        demo = {**DEMO_DEFAULTS, "eval_steps": None}
        if isinstance(values.get("max_steps"), int) and values["max_steps"] > 0:
            # The demo's warmup is sized for its own run length; a shorter explicit --max-steps shortens it too.
            demo["warmup_steps"] = min(demo["warmup_steps"], values["max_steps"])
        values = {**demo, **values}
    return TrainConfig.from_dict(values, source=source)


def requested_resume(args: argparse.Namespace) -> str | None:
    """The ``resume`` path from the flags or the TOML file, before the config is resolved."""
    if getattr(args, "resume", None):
        return args.resume
    if getattr(args, "config", None):
        return _coerce("resume", load_toml(args.config).get("resume"), f"--config {args.config}")
    return None
