"""PagedAdamW: bit-identical to AdamW wherever the pages live; budget, eviction and checkpoints."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_helpers import (assert_same_run, grads_in_place, make_params, param_groups, random_grads, run_steps,
                           run_with_and_without_plan)

from nf4lora.kernels import use_kernels
from nf4lora.optim import AdamW, PagedAdamW
from nf4lora.optim.adamw import state_layout


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("budget", [None, 0, 6000], ids=["fits", "all-paged", "smaller-than-a-param"])
def test_paged_adamw_matches_adamw_bit_for_bit(optim_bits, budget):
    params, paged_params = make_params(), make_params()
    adamw = AdamW(param_groups(params), lr=1e-2, weight_decay=0.05, optim_bits=optim_bits)
    paged = PagedAdamW(param_groups(paged_params), lr=1e-2, weight_decay=0.05, optim_bits=optim_bits,
                       gpu_budget_bytes=budget, page_bytes=4096)
    run_steps(adamw, params, 8)
    run_steps(paged, paged_params, 8)
    assert_same_run(params, adamw, paged_params, paged)
    if budget is not None:
        assert paged.resident_bytes <= budget
    if budget == 6000:  # the first param's state (45 KB, or 11 KB in 8 bits) is split between device and host
        pages = paged.state[paged_params[0]]["pages"]
        assert {page.resident for page in pages} == {True, False}


@settings(max_examples=12, deadline=None)
@given(page_kib=st.integers(2, 48), budget_kib=st.integers(0, 160), optim_bits=st.sampled_from([32, 8]),
       evict_kib=st.integers(0, 64))
def test_any_page_size_budget_and_eviction_give_adamw_bits(page_kib, budget_kib, optim_bits, evict_kib):
    params, paged_params = make_params(), make_params()
    adamw = AdamW(param_groups(params), lr=1e-2, optim_bits=optim_bits)
    paged = PagedAdamW(param_groups(paged_params), lr=1e-2, optim_bits=optim_bits,
                       gpu_budget_bytes=budget_kib << 10, page_bytes=page_kib << 10)
    run_steps(adamw, params, 2)
    run_steps(paged, paged_params, 2)
    paged.evict(evict_kib << 10)  # mid-run, as the trainer does on out-of-memory
    run_steps(adamw, params, 2, start=3)
    run_steps(paged, paged_params, 2, start=3)
    assert_same_run(params, adamw, paged_params, paged)


@pytest.mark.parametrize("budget", [0, 6000])  # 0: a slot fill holds two pages; 6000: some pages stay resident
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_triton_step_gives_the_reference_bits_with_paging(device, optim_bits, budget):
    # Triton on the GPU (or under TRITON_INTERPRET=1 on the CPU): several segments in one launch, pages streamed
    # through the double buffer, vs AdamW on the pure-PyTorch path
    params, paged_params = make_params(device=device), make_params(device=device)
    adamw = AdamW(param_groups(params), lr=1e-2, optim_bits=optim_bits)
    paged = PagedAdamW(param_groups(paged_params), lr=1e-2, optim_bits=optim_bits, gpu_budget_bytes=budget,
                       page_bytes=16384)
    with use_kernels("reference"):
        run_steps(adamw, params, 3)
    with use_kernels("triton"):
        run_steps(paged, paged_params, 3)
    assert_same_run(params, adamw, paged_params, paged)


def test_pages_respect_page_bytes_and_8bit_block_boundaries():
    params = make_params()
    paged = PagedAdamW(params, optim_bits=8, page_bytes=3000)
    run_steps(paged, params, 1)
    for p in params:
        pages = paged.state[p]["pages"]
        assert sum(page.numel for page in pages) == p.numel()
        for page in pages:
            assert page.start % 256 == 0 and page.nbytes <= 3000


def test_evict_frees_bytes_and_lowers_the_budget():
    params = make_params()
    paged = PagedAdamW(params, lr=1e-2, page_bytes=8192)
    run_steps(paged, params, 1)
    total = paged.resident_bytes
    assert paged.paged_out_bytes == 0 and total == sum(
        page.nbytes for p in params for page in paged.state[p]["pages"])
    freed = paged.evict(10_000)
    assert 10_000 <= freed <= 10_000 + 8192  # whole pages, at most one more than asked
    assert paged.resident_bytes == total - freed == paged.budget
    assert paged.paged_out_bytes == freed
    run_steps(paged, params, 1, start=2)
    assert paged.resident_bytes == total - freed  # evicted pages stay on the host
    assert paged.evict(10 * total) == total - freed and paged.resident_bytes == 0


def test_streaming_layout_is_built_once_and_dropped_when_a_page_moves():
    params = make_params()
    paged = PagedAdamW(params, lr=1e-2, gpu_budget_bytes=0, page_bytes=8192)
    run_steps(paged, params, 1)
    layout = paged._plan.devices[0].stream
    pages = [page for p in params for page in paged.state[p]["pages"]]
    copied = [page for copies, _ in layout.batches for page, _ in copies]
    assert copied == pages  # every paged-out page, in order, each in exactly one batch
    assert all(sum(page.nbytes for page, _ in copies) <= 8192 for copies, _ in layout.batches)
    run_steps(paged, params, 2, start=2)
    assert paged._plan.devices[0].stream is layout  # reused while nothing moves
    paged.budget = 20_000  # promotes pages: the layout must go with them
    assert paged._plan is None
    run_steps(paged, params, 1, start=4)
    assert paged._plan.devices[0].stream is not layout


def test_raising_the_budget_promotes_pages_back():
    params = make_params()
    paged = PagedAdamW(params, lr=1e-2, gpu_budget_bytes=0, page_bytes=8192)
    run_steps(paged, params, 1)
    assert paged.resident_bytes == 0
    paged.budget = 50_000
    assert 50_000 - 8192 < paged.resident_bytes <= 50_000
    paged.budget = None
    assert paged.paged_out_bytes == 0


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_paged_state_dict_resumes_bit_exactly_across_optimizers(optim_bits):
    params = make_params()
    paged = PagedAdamW(param_groups(params), lr=1e-2, optim_bits=optim_bits, gpu_budget_bytes=10_000,
                       page_bytes=4096)
    run_steps(paged, params, 4)
    checkpoint = copy.deepcopy(paged.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run_steps(paged, params, 4, start=5)

    # into plain AdamW, and into a PagedAdamW with other pages and budget: the same trajectory
    adamw = AdamW(param_groups(resumed_params), optim_bits=optim_bits)
    adamw.load_state_dict(checkpoint)
    run_steps(adamw, resumed_params, 4, start=5)
    other = PagedAdamW(param_groups(again_params), optim_bits=optim_bits, gpu_budget_bytes=0, page_bytes=16384)
    other.load_state_dict(checkpoint)
    run_steps(other, again_params, 4, start=5)
    assert_same_run(params, paged, resumed_params, adamw)
    assert_same_run(params, paged, again_params, other)


def test_load_state_dict_refuses_a_different_layout():
    params = make_params()
    paged = PagedAdamW(params, page_bytes=4096)
    run_steps(paged, params, 1)
    checkpoint = copy.deepcopy(paged.state_dict())
    checkpoint["state"][1]["exp_avg"] = torch.zeros(4999)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of param 1 has shape \(4999,\), expected \(5000,\)"):
        paged.load_state_dict(checkpoint)
    assert paged.resident_bytes == sum(state_layout(p.numel(), False)[1] for p in params)


def _pages_moved(step, params, optimizer, generator):
    grads_in_place(params, generator, step)
    if step == 3:
        optimizer.evict(20_000)
    if step == 5:
        optimizer.budget = None


def _grads_come_and_go(step, params, optimizer, generator):
    random_grads(params, generator, step)
    if step in (2, 3):
        params[0].grad = None


@pytest.mark.parametrize("scenario", [_pages_moved, _grads_come_and_go], ids=["pages_moved", "grads_come_and_go"])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_step_plan_gives_the_bits_of_rebuilt_steps(device, optim_bits, scenario):
    # 32-bit: 2 of 14 pages resident (segments at offsets in the plan's launch), the rest streamed; 8-bit: all
    # resident until the eviction
    def make(params):
        return PagedAdamW(param_groups(params), lr=1e-2, optim_bits=optim_bits, gpu_budget_bytes=40_000,
                          page_bytes=16384)

    (cached, cached_opt), (rebuilt, rebuilt_opt) = run_with_and_without_plan(make, scenario, 6, device=device)
    assert_same_run(cached, cached_opt, rebuilt, rebuilt_opt)


@pytest.mark.parametrize("kwargs,match", [
    ({"page_bytes": 1000}, "page_bytes must be >= 2048"),
    ({"gpu_budget_bytes": -1}, "gpu_budget_bytes must be None or >= 0"),
    ({"lr": -1.0}, "lr must be"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW(make_params(), **kwargs)


def test_bad_evict_and_budget_raise():
    paged = PagedAdamW(make_params())
    with pytest.raises(ValueError, match="evict's nbytes must be an int >= 0, got -5"):
        paged.evict(-5)
    with pytest.raises(ValueError, match="gpu_budget_bytes must be None or >= 0, got -1"):
        paged.budget = -1


# ----------------------------------------------------------------------------------------------------------------
# GPU: pinned host pages, side streams, memory bound
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget_fraction", [1.0, 0.125, 0.0])
def test_paged_adamw_on_gpu_matches_adamw_bit_for_bit(optim_bits, dtype, budget_fraction):
    shapes = [(1024, 1000), (64, 4096), (4096, 64), (77,), (3000, 17)]
    params = make_params(shapes, dtype=dtype, device="cuda")
    paged_params = make_params(shapes, dtype=dtype, device="cuda")
    total = sum(state_layout(p.numel(), optim_bits == 8 and p.numel() >= 4096)[1] for p in params)
    budget = int(total * budget_fraction)
    adamw = AdamW(param_groups(params), lr=1e-2, optim_bits=optim_bits)
    paged = PagedAdamW(param_groups(paged_params), lr=1e-2, optim_bits=optim_bits, gpu_budget_bytes=budget,
                       page_bytes=1 << 20)
    run_steps(adamw, params, 5)
    run_steps(paged, paged_params, 5)
    assert_same_run(params, adamw, paged_params, paged)
    assert paged.resident_bytes <= budget


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_held_is_bounded_by_budget_plus_double_buffer():
    params = make_params([(4096, 1024)] * 8, device="cuda")  # 8 x 32 MiB of state
    page_bytes = 4 << 20
    budget = 32 << 20
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    paged = PagedAdamW(params, lr=1e-3, gpu_budget_bytes=budget, page_bytes=page_bytes)
    for _ in range(3):
        paged.step()
    torch.cuda.synchronize()
    held_peak = torch.cuda.max_memory_allocated() - before
    # budget + two page slots + the kernel's small per-launch tables (< 1 MiB here)
    assert held_peak <= budget + 2 * page_bytes + (1 << 20)
    # between steps: the resident pages and the two slots, kept with the streaming layout
    assert budget + 2 * page_bytes <= torch.cuda.memory_allocated() - before <= budget + 2 * page_bytes + (1 << 20)
    paged.evict(budget)  # a page moved: the layout and its slots go, all the device memory with them
    assert torch.cuda.memory_allocated() - before <= (1 << 20)
    assert all(page.buffer.is_pinned() for p in params for page in paged.state[p]["pages"] if not page.resident)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evict_returns_gpu_memory_at_once():
    params = make_params([(4096, 1024)] * 4, device="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    paged = PagedAdamW(params, lr=1e-3)
    paged.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = paged.evict(64 << 20)
    assert freed >= 64 << 20
    assert before - torch.cuda.memory_allocated() >= freed
