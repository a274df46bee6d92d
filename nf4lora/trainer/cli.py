"""The ``nf4lora`` console script: ``train`` (what ``python train.py`` runs), ``generate``, ``merge``, ``quantize``
and ``inspect``.

Bad input (a missing or unreadable path, an output directory that cannot be written, a malformed data file, an
invalid hyper-parameter, LoRA targets that match nothing, an incompatible ``--resume``, an occupied ``--output-dir``)
ends with one line on stderr naming the problem and the fix, and exit code 2; so do argparse's own errors (a
mistyped choice, a missing flag). Training that cannot go on (out of memory, a non-finite loss, a full disk) ends
with one line saying what was kept, and exit code 1. Ctrl-C during training exits with 130 after saving.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import NoReturn

from .config import (BLOCKSIZES, DEMO_DEFAULTS, DEVICES, DTYPES, QUANTIZATIONS, UsageError, add_train_arguments,
                     config_from_args, requested_resume)
from .loop import TrainingFailed

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a mistyped choice, a missing flag) in one line like the CLI's others: its default prints
    the whole usage first, 25 lines for ``train``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _train(args: argparse.Namespace) -> int:
    from .checkpoint import read_resume
    from .job import run_train

    path = requested_resume(args)
    resume = read_resume(path) if path else None  # read and verified here once: the config comes from its state
    summary = run_train(config_from_args(args, resume.state["config"] if resume else None), resume=resume)
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


# --dtype of merge and quantize: the rule of commands.written_dtype
WRITTEN_DTYPE_HELP = ("dtype of the tensors written unquantized (embeddings, norms, output head), which a 4-bit "
                      "checkpoint also records as its compute dtype; auto = bf16 on every device")


def _model_loading_flags(parser: argparse.ArgumentParser, dtype: str = "auto", from_run: bool = False,
                         dtype_help: str = "compute dtype and dtype of the unquantized tensors") -> None:
    """With ``from_run`` the 4-bit format flags default to None: the command takes the format of the run that trained
    its --adapter (``commands._fill_base_format``)."""
    run = "that of the run that trained --adapter, else " if from_run else ""
    parser.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    parser.add_argument("--quantization", default=None if from_run else "nf4", choices=QUANTIZATIONS,
                        help=f"base weight format (default: {run}nf4)")
    parser.add_argument("--blocksize", type=int, default=None if from_run else 64, choices=BLOCKSIZES,
                        help=f"quantization blocksize (default: {run}64)")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None if from_run else True,
                        help=f"double quantization of the absmax constants (default: {run}on)")
    parser.add_argument("--dtype", default=dtype, choices=DTYPES,
                        help=f"{dtype_help} (default: {dtype})")
    parser.add_argument("--device", default="auto", choices=DEVICES)


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = _Parser(prog="nf4lora", description="QLoRA fine-tuning on NF4 Llama models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in DEMO_DEFAULTS.items())
    train = sub.add_parser("train", help="fine-tune a LoRA adapter on a 4-bit base (no flags: the embedded demo)",
                           description="Fine-tune a LoRA adapter on an NF4-quantized Llama. With no flags, trains "
                                       "on a generated model and dataset, offline, in about two minutes on a CPU. "
                                       "Without --model and --data the demo's own defaults replace those listed "
                                       f"below: {demo} (explicit flags still win).")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    gen = sub.add_parser("generate", help="generate from a base model, optionally with an adapter")
    _model_loading_flags(gen, from_run=True)
    gen.add_argument("--adapter", help="peft-format adapter directory")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", help="a file with one prompt per line (.txt) or prompt records (.jsonl)")
    gen.add_argument("--template", default=None,
                     help="wrap each prompt ({prompt} placeholder); default: the template of the run that trained "
                          "--adapter, else none")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=commands.generate_command)

    merge = sub.add_parser("merge", help="fold an adapter into the base and save a Hugging Face checkpoint")
    _model_loading_flags(merge, from_run=True, dtype_help=f"{WRITTEN_DTYPE_HELP}; with auto a CPU computes the "
                                                         f"merge in fp32, rounded once when written")
    merge.add_argument("--adapter", required=True, help="peft-format adapter directory")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--quantize", default="none", choices=("none", "nf4"),
                       help="none: dense safetensors; nf4: a bitsandbytes-format 4-bit checkpoint")
    merge.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
    merge.set_defaults(func=commands.merge_command)

    quantize = sub.add_parser("quantize", help="save a bitsandbytes-format NF4 checkpoint")
    _model_loading_flags(quantize, dtype="bf16", dtype_help=WRITTEN_DTYPE_HELP)
    quantize.add_argument("--out", required=True, help="output directory")
    quantize.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
    quantize.set_defaults(func=commands.quantize_command)

    inspect = sub.add_parser("inspect", help="architecture, parameter counts, bytes per parameter, LoRA targets")
    inspect.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    inspect.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES)
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object instead")
    inspect.set_defaults(func=commands.inspect_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nf4lora`` and ``python train.py``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # warnings print as one line in the style of the errors, not with the source file and line of the library
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_: f"nf4lora {args.command}: warning: {_first_line(message)}\n"
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"nf4lora {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingFailed as exc:
        print(f"nf4lora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nf4lora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `nf4lora inspect ... | head` closed stdout early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = formatwarning


def _first_line(message: object) -> str:
    """The first line of an exception's or a warning's text, or the exception's class name when it has none."""
    text = str(message).strip()
    return text.splitlines()[0] if text else type(message).__name__


if __name__ == "__main__":
    sys.exit(main())
