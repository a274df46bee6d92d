"""benchmarks/common.py: the harness's unit arithmetic and the CUDA-graph capture, checked on the CPU."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from benchmarks import common


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass


def test_capture_keeps_every_output_alive_until_the_capture_ends(monkeypatch):
    # An output dropped during capture returns its block to the graph's pool and the next call reuses it: all the
    # calls would write one buffer, which stays in L2 when it fits. Each call must get its own output.
    refs, alive_at_end = [], []

    @contextlib.contextmanager
    def fake_graph(graph):
        refs.clear()  # the warm-up calls before the capture may drop theirs
        yield
        alive_at_end.extend(ref() is not None for ref in refs)

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)

    def call() -> torch.Tensor:
        out = torch.empty(4)
        refs.append(weakref.ref(out))
        return out

    common._capture([call] * 3)
    assert alive_at_end == [True, True, True]


def test_streaming_rate_is_decimal_gb_per_s_and_percent_of_copy():
    # 4e9 bytes in 1000 ms is 4 GB/s (1e9, not 2**30); at a copy rate of 8 GB/s that is 50 %
    assert common.streaming_rate(4_000_000_000, 1000.0, copy_gbs=8.0) == pytest.approx({"GB/s": 4.0, "%copy": 50.0})


def test_peer_ratios_put_the_peer_over_ours():
    assert common.peer_ratios({"ours_ms": 2.0, "bnb_ms": 3.0, "bf16_ms": 1.0}) == {"vs_bnb": 1.5, "vs_bf16": 0.5}


def test_copies_for_reaches_the_rotation_bytes_within_bounds():
    assert common.copies_for(common.ROTATION_BYTES // 4) == 4
    assert common.copies_for(common.ROTATION_BYTES // 4 - 1) == 5  # 4 copies would fall 4 bytes short
    assert common.copies_for(10 * common.ROTATION_BYTES) == 1
    assert common.copies_for(1) == common.MAX_COPIES


def test_alternating_rounds_rotates_the_first_peer_and_returns_times_in_fn_order(monkeypatch):
    calls = []

    def fake_bench(fn, warmup_ms=25, rep_ms=200):
        calls.append(fn())
        return float(len(calls))

    monkeypatch.setattr(common, "bench", fake_bench)
    times = common.alternating_rounds([lambda: "a", lambda: "b", lambda: "c"], rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # times[round][fn]: the call number at which each fn ran in that round
    assert times == [[1.0, 2.0, 3.0], [6.0, 4.0, 5.0], [8.0, 9.0, 7.0]]
