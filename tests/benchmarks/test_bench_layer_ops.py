"""benchmarks/layer_ops.py's prefill rate, on a stub model and a fake clock."""

from __future__ import annotations

import types

import torch
from torch import nn

from benchmarks import layer_ops as bench_layer_ops


class _StubModel:
    """Each forward advances the fake clock by the next duration."""

    config = types.SimpleNamespace(vocab_size=8)

    def __init__(self, clock, durations):
        self.clock, self.durations = clock, iter(durations)
        self.lm_head = nn.Linear(1, 1)

    def new_cache(self, batch, length):
        return None

    def __call__(self, prompt, cache, logits_to_keep):
        self.clock.now += next(self.durations)


def test_prefill_rate_is_the_median_of_the_timed_runs(monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(bench_layer_ops, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    # a 10 s warm-up, then 1, 5 and 3 s: the median is 3 s (the fastest, 1 s, overstated the rate 3x)
    model = _StubModel(clock, [10.0, 1.0, 5.0, 3.0])
    assert bench_layer_ops.prefill_tok_s(model, 96) == 32.0
