"""The docs against the tree: cited result files and source files exist, CLI flags and subcommands are real, and the
README's NF4 snippet runs on the CPU and prints what its comments say."""

import argparse
import re
from pathlib import Path

import pytest
import torch

from nf4lora.trainer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"]
RESULTS = ROOT / "benchmarks" / "results"
# `..._name_h200.md` abbreviates 2026-11-2x_name_h200.md; a trailing * stands for any run suffix
ABBREVIATED = re.compile(r"`\.\.\._([^`\s]+)`")
FULL = re.compile(r"`benchmarks/results/([^`\s]+)`")
SOURCE = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)`")
# bare names sit in the package named by the sentence around them (kernels/rms_norm.py, `rope_cache.py`)
SOURCE_DIRS = [ROOT, ROOT / "nf4lora", ROOT / "nf4lora" / "nf4", ROOT / "nf4lora" / "kernels"]
# flags of the benchmark scripts that the README quotes, with the script that must define them
BENCHMARK_FLAGS = {"--backward-thread": ROOT / "benchmarks" / "kernels.py"}


def doc_text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def result_pattern(name: str, abbreviated: bool) -> re.Pattern:
    escaped = re.escape(name).replace(r"\*", ".*")
    return re.compile((r"\d{4}-\d\d-\d\d_" if abbreviated else "") + escaped)


def test_every_cited_result_file_exists():
    present = [path.name for path in RESULTS.iterdir()]
    cited = [(name, True) for name in ABBREVIATED.findall(doc_text())]
    cited += [(name, False) for name in FULL.findall(doc_text())]
    assert len(cited) > 30  # the patterns still find the citations
    missing = [name for name, abbreviated in cited
               if not any(result_pattern(name, abbreviated).fullmatch(p) for p in present)]
    assert not missing, f"cited but not in benchmarks/results/: {missing}"


def test_every_cited_source_file_exists():
    cited = set(SOURCE.findall(doc_text()))
    assert {"kernels/launch.py", "lora/fused.py", "benchmarks/split_k.py"} <= cited
    missing = [name for name in sorted(cited) if not any((d / name).is_file() for d in SOURCE_DIRS)]
    assert not missing, f"cited source files that do not exist: {missing}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_documented_subcommand_and_flag_exists():
    parsers = subcommands()
    text = doc_text()
    used = set(re.findall(r"^nf4lora (\w+)", text, flags=re.M)) | set(re.findall(r"`nf4lora (\w+)", text))
    assert {"train", "generate", "merge", "quantize", "inspect"} <= used
    assert used <= set(parsers), f"documented subcommands that the CLI lacks: {used - set(parsers)}"
    flags = {f for p in parsers.values() for a in p._actions for f in a.option_strings}
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    unknown = [f for f in sorted(documented - flags)
               if not (f in BENCHMARK_FLAGS and f in BENCHMARK_FLAGS[f].read_text())]
    assert not unknown, f"documented flags no command or cited benchmark accepts: {unknown}"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_nf4_snippet_runs_and_matches_its_comments():
    snippet = next(s for s in python_snippets() if "from nf4lora.nf4 import" in s)
    names: dict = {}
    exec(compile(snippet, "README.md", "exec"), names)
    q, w = names["q"], names["w"]
    shape_comment = re.search(r"q\.packed\s+# \((\d+),\) uint8", snippet)
    assert q.packed.shape == (int(shape_comment.group(1)),) and q.packed.dtype == torch.uint8
    bits = float(re.search(r"q\.bits_per_param\s+# ([\d.]+)", snippet).group(1))
    assert q.bits_per_param == pytest.approx(bits, abs=5e-4)
    assert q.state.absmax.dtype == torch.uint8
    assert w.shape == (4096, 4096) and w.dtype == torch.bfloat16
