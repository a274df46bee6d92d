"""AdamW: agreement with torch.optim.AdamW, 8-bit states, checkpoints, errors, and the reused step plan."""

import copy

import pytest
import torch
from optim_helpers import (assert_same_run, grads_in_place, make_params, param_groups, random_grads,
                           run_steps, run_with_and_without_plan)

from nf4lora.kernels import use_kernels
from nf4lora.nf4.blockwise import dequantize_blockwise
from nf4lora.nf4.codebook import dynamic_map
from nf4lora.optim import AdamW


def _assert_close_to_scale(actual, expected, rel):
    """|actual - expected| <= rel * max|expected|: relative to the tensor's scale, not per element."""
    scale = expected.abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() <= rel * scale


def test_adamw_matches_torch_adamw_over_100_steps():
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(param_groups(ours_params), lr=1e-2, weight_decay=0.05)
    reference = torch.optim.AdamW(param_groups(torch_params), lr=1e-2, weight_decay=0.05)
    run_steps(ours, ours_params, 100)
    run_steps(reference, torch_params, 100)
    state = ours.state_dict()["state"]
    for i, (p, q) in enumerate(zip(ours_params, torch_params)):
        # both float32 with one rounding per op, in a different op order (torch lerps and fuses addcdiv):
        # a few ulps of the tensor's scale, so 1e-6 relative
        _assert_close_to_scale(p, q, 1e-6)
        for name in ("exp_avg", "exp_avg_sq"):
            _assert_close_to_scale(state[i][name], reference.state[q][name], 1e-6)


def test_lr_scheduler_drives_the_step_like_torch():
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(param_groups(ours_params), lr=1e-2)
    reference = torch.optim.AdamW(param_groups(torch_params), lr=1e-2)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (ours, reference)]
    for step in range(1, 11):
        run_steps(ours, ours_params, 1, start=step)
        run_steps(reference, torch_params, 1, start=step)
        for scheduler in schedulers:
            scheduler.step()
    assert ours.param_groups[1]["lr"] == reference.param_groups[1]["lr"]
    for p, q in zip(ours_params, torch_params):
        _assert_close_to_scale(p, q, 1e-6)  # as in the 100-step comparison


def test_params_without_grad_are_untouched_and_zero_grad_clears():
    params = make_params()
    optimizer = AdamW(params, lr=1e-2)
    run_steps(optimizer, params, 1)
    frozen = params[1].detach().clone()
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    assert torch.equal(params[1], frozen)
    assert optimizer.state_dict()["state"][0]["step"] == 2
    assert optimizer.state_dict()["state"][1]["step"] == 1


def test_bf16_params_keep_float32_states():
    params = make_params(dtype=torch.bfloat16)
    optimizer = AdamW(params, lr=1e-2)
    run_steps(optimizer, params, 3)
    for entry in optimizer.state_dict()["state"].values():
        assert entry["exp_avg"].dtype == torch.float32 and entry["exp_avg_sq"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in params)


def test_8bit_states_follow_bitsandbytes_layout_with_small_params_in_32bit():
    params = make_params()
    optimizer = AdamW(params, lr=1e-2, optim_bits=8)
    run_steps(optimizer, params, 2)
    state = optimizer.state_dict()["state"]
    assert set(state[1]) == {"step", "state1", "state2", "absmax1", "absmax2"}
    assert state[1]["state1"].dtype == torch.uint8 and state[1]["state1"].shape == params[1].shape
    assert state[1]["absmax1"].shape == (-(-5000 // 256),)
    # 33*170 = 5610 elements get 8-bit states; 3 and 70*130 = 9100 vs min_8bit_size 4096
    assert set(state[2]) == {"step", "exp_avg", "exp_avg_sq"}
    assert "state1" in state[3]


def _bnb_protocol_errors(optimizer_factory, steps=100):
    """bitsandbytes' test_optimizer8bit protocol (100 steps): params randn*0.1, grads randn*0.01;
    after each step compare with float32 AdamW, then re-synchronise the float32 run to the 8-bit one (params and
    dequantized states). Returns the worst value of each measure over the steps."""
    g = torch.Generator().manual_seed(0)
    p8 = torch.nn.Parameter(torch.randn(256, 257, generator=g) * 0.1)
    p32 = torch.nn.Parameter(p8.detach().clone())
    eight, thirty_two = optimizer_factory([p8]), torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0)
    worst = {"param_mismatches": 0, "err_mean": 0.0, "relerr_mean": 0.0, "state_mismatches": 0}
    for _ in range(steps):
        grad = torch.randn(p8.shape, generator=g) * 0.01
        p8.grad, p32.grad = grad.clone(), grad.clone()
        eight.step()
        thirty_two.step()
        entry = eight.state_dict()["state"][0]
        states = [dequantize_blockwise(entry["state" + i], entry["absmax" + i], dynamic_map(signed), 256,
                                       torch.float32).view(p8.shape) for i, signed in (("1", True), ("2", False))]
        for name, dequantized in zip(("exp_avg", "exp_avg_sq"), states):
            close = torch.isclose(thirty_two.state[p32][name], dequantized, atol=3e-3, rtol=1e-3)
            worst["state_mismatches"] = max(worst["state_mismatches"], int((~close).sum()))
        err = (p32 - p8).abs()
        worst["param_mismatches"] = max(worst["param_mismatches"],
                                        int((~torch.isclose(p8, p32, atol=1e-5, rtol=1e-3)).sum()))
        worst["err_mean"] = max(worst["err_mean"], err.mean().item())
        worst["relerr_mean"] = max(worst["relerr_mean"], (err / (p32.abs() + 1e-9)).mean().item())
        with torch.no_grad():
            p32.copy_(p8)
            for name, dequantized in zip(("exp_avg", "exp_avg_sq"), states):
                thirty_two.state[p32][name].copy_(dequantized)
    return worst


def test_8bit_adamw_tracks_float32_within_bitsandbytes_tolerance():
    worst = _bnb_protocol_errors(lambda params: AdamW(params, lr=1e-3, weight_decay=0.0, optim_bits=8))
    # bitsandbytes' own bounds for adam8bit_blockwise in float32 (tests/test_optim.py::test_optimizer8bit):
    # <= 5 params outside atol 1e-5 / rtol 1e-3, mean abs error < 1.2e-4, mean relative error < 1.2e-3, and
    # fewer than 20 state elements outside atol 3e-3 / rtol 1e-3 per step
    assert worst["param_mismatches"] <= 5
    assert worst["err_mean"] < 1.2e-4
    assert worst["relerr_mean"] < 1.2e-3
    assert worst["state_mismatches"] < 20


def test_8bit_adamw_trains_a_regression_to_the_float32_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 512, generator=g)
    y = x @ (torch.randn(512, 8, generator=g) * 0.1) + 0.01 * torch.randn(1024, 8, generator=g)
    losses = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(torch.zeros(512, 8))  # 4096 elements: 8-bit states at the default min_8bit_size
        optimizer = AdamW([w], lr=2e-2, weight_decay=0.0, optim_bits=bits)
        for _ in range(100):
            loss = torch.nn.functional.mse_loss(x @ w, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[bits] = torch.nn.functional.mse_loss(x @ w, y).item()
    initial = y.pow(2).mean().item()
    assert losses[32] < 0.01 * initial
    # "the same loss": the 8-bit run ends within 10% of the float32 run's
    assert losses[8] == pytest.approx(losses[32], rel=0.1)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_state_dict_round_trip_resumes_bit_exactly(optim_bits):
    params = make_params()
    optimizer = AdamW(param_groups(params), lr=1e-2, optim_bits=optim_bits)
    run_steps(optimizer, params, 5)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run_steps(optimizer, params, 5, start=6)

    resumed = AdamW(param_groups(resumed_params, lr=0.5), lr=0.5, optim_bits=optim_bits)
    resumed.load_state_dict(checkpoint)
    assert resumed.param_groups[1]["lr"] == 3e-3
    for name, value in checkpoint["state"][1].items():
        assert torch.equal(resumed.state_dict()["state"][1][name], value)
    run_steps(resumed, resumed_params, 5, start=6)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_loads_a_torch_adamw_state_dict():
    torch_params, ours_params = make_params(), make_params()
    reference = torch.optim.AdamW(torch_params, lr=1e-2)
    run_steps(reference, torch_params, 3)
    for p, q in zip(ours_params, torch_params):
        p.data.copy_(q)
    ours = AdamW(ours_params, lr=1e-2)
    ours.load_state_dict(reference.state_dict())
    run_steps(reference, torch_params, 3, start=4)
    run_steps(ours, ours_params, 3, start=4)
    for p, q in zip(ours_params, torch_params):
        _assert_close_to_scale(p, q, 1e-6)  # as in the 100-step comparison


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr must be"),
    ({"betas": (1.0, 0.999)}, "betas must be"),
    ({"betas": (0.9, -0.1)}, "betas must be"),
    ({"eps": -1e-8}, "eps must be"),
    ({"weight_decay": -0.1}, "weight_decay must be"),
    ({"optim_bits": 16}, "optim_bits must be one of"),
    ({"min_8bit_size": -1}, "min_8bit_size must be"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kwargs)


def test_bad_group_hyperparameters_raise():
    params = make_params()
    with pytest.raises(ValueError, match=r"lr must be a float >= 0, got -0.1"):
        AdamW(param_groups(params, lr=-0.1))


def test_integer_params_are_refused():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        AdamW([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd["param_groups"].pop(), "param groups"),
    (lambda sd: sd["param_groups"][1]["params"].pop(), "param group 1 has"),
    (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3, 3)), "state 'exp_avg' of param 0 has shape"),
    (lambda sd: sd["state"][0].pop("exp_avg_sq"), "expects"),
])
def test_load_state_dict_refuses_a_different_layout(mutate, match):
    params = make_params()
    optimizer = AdamW(param_groups(params), lr=1e-2)
    run_steps(optimizer, params, 1)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    mutate(checkpoint)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(checkpoint)
    for name, value in before["state"][0].items():  # a refused dict leaves the optimizer as it was
        assert torch.equal(optimizer.state_dict()["state"][0][name], value)


def test_load_state_dict_refuses_8bit_state_in_a_32bit_optimizer():
    params = make_params()
    eight = AdamW(params, lr=1e-2, optim_bits=8)
    run_steps(eight, params, 1)
    with pytest.raises(ValueError, match=r"state of param 0 has keys .* expects"):
        AdamW(params, lr=1e-2).load_state_dict(eight.state_dict())


def test_sparse_and_non_contiguous_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 6).t())
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="contiguous"):
        AdamW([p]).step()
    q = torch.nn.Parameter(torch.randn(4))
    q.grad = torch.ones(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        AdamW([q]).step()


def test_8bit_adamw_matches_bitsandbytes_adamw8bit_on_cpu():
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    g = torch.Generator().manual_seed(0)
    ours_param = torch.nn.Parameter(torch.randn(256, 257, generator=g) * 0.1)
    bnb_param = torch.nn.Parameter(ours_param.detach().clone())
    ours = AdamW([ours_param], lr=1e-3, weight_decay=0.01, optim_bits=8)
    theirs = bnb_optim.AdamW8bit([bnb_param], lr=1e-3, weight_decay=0.01)
    for _ in range(20):
        grad = torch.randn(ours_param.shape, generator=g) * 0.01
        ours_param.grad, bnb_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    state = ours.state_dict()["state"][0]
    for name in ("state1", "state2"):
        # same dequantize / update / requantize; codes differ only where the two op orders (theirs addcdiv)
        # round a moment across a bin edge
        mismatches = (state[name] != theirs.state[bnb_param][name].view(ours_param.shape)).sum().item()
        assert mismatches <= 10, (name, mismatches)
    # bitsandbytes' parameter tolerance for 8-bit blockwise Adam (test_optimizer8bit): atol 1e-5, rtol 1e-3,
    # at most 5 elements outside
    assert (~torch.isclose(ours_param, bnb_param, atol=1e-5, rtol=1e-3)).sum().item() <= 5


def test_unsupported_torch_options_are_refused():
    torch_params = make_params()
    reference = torch.optim.AdamW(torch_params, lr=1e-2, amsgrad=True)
    run_steps(reference, torch_params, 1)
    ours = AdamW(make_params(), lr=1e-2)
    with pytest.raises(ValueError, match=r"amsgrad=True is not supported"):
        ours.load_state_dict({"state": {}, "param_groups": reference.state_dict()["param_groups"]})
    with pytest.raises(ValueError, match=r"maximize=True is not supported"):
        AdamW([{"params": make_params(), "maximize": True}])


# ----------------------------------------------------------------------------------------------------------------
# The step plan: reused between steps, it must give the bits of a step that rebuilds everything
# ----------------------------------------------------------------------------------------------------------------

def _fresh_grads(step, params, optimizer, generator):
    random_grads(params, generator, step)  # new tensors every step, as autograd after zero_grad(set_to_none=True)


def _in_place_grads(step, params, optimizer, generator):
    grads_in_place(params, generator, step)


def _grad_lost_and_regained(step, params, optimizer, generator):
    grads_in_place(params, generator, step)
    if step in (3, 4):
        params[1].grad = None  # its step count falls behind the others': a second scalar row from step 5
    if step < 3:
        params[3].grad = None  # its first gradient comes at step 3


def _lr_scheduled(step, params, optimizer, generator):
    grads_in_place(params, generator, step)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2 / step


def _param_storage_replaced(step, params, optimizer, generator):
    grads_in_place(params, generator, step)
    if step == 3:
        params[2].data = params[2].data.clone()  # as module.to() does: same Parameter, new memory
        params[0].data = params[0].data.clone()


def _state_reloaded(step, params, optimizer, generator):
    grads_in_place(params, generator, step)
    if step == 3:
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


def _group_added(step, params, optimizer, generator):
    grads_in_place(params, generator, step)
    if step == 3:
        optimizer.add_param_group({"params": params[3:], "lr": 3e-3})


def _non_contiguous_grads(step, params, optimizer, generator):
    random_grads(params, generator, step)
    if step % 2:
        for p in params:
            if p.dim() == 2:
                p.grad = p.grad.t().contiguous().t()  # the same values, column-major


_SCENARIOS = [_fresh_grads, _in_place_grads, _grad_lost_and_regained, _lr_scheduled, _param_storage_replaced,
              _state_reloaded, _group_added, _non_contiguous_grads]


def _make_adamw(optim_bits, scenario):
    def make(params):
        groups = [{"params": params[:3]}] if scenario is _group_added else param_groups(params)
        return AdamW(groups, lr=1e-2, weight_decay=0.05, optim_bits=optim_bits)
    return make


# 8-bit states change the launch's kind, not the plan's logic: two scenarios (the interpreter is slow on them)
@pytest.mark.parametrize("optim_bits,scenario", [(32, scenario) for scenario in _SCENARIOS] + [
    (8, _fresh_grads), (8, _grad_lost_and_regained)], ids=lambda x: x.__name__.strip("_") if callable(x) else x)
def test_step_plan_gives_the_bits_of_rebuilt_steps(device, optim_bits, scenario):
    # Triton on the GPU, else under TRITON_INTERPRET=1: the kernel tables are what the plan keeps
    (cached, cached_opt), (rebuilt, rebuilt_opt) = run_with_and_without_plan(
        _make_adamw(optim_bits, scenario), scenario, 5, device=device)
    assert_same_run(cached, cached_opt, rebuilt, rebuilt_opt)


def test_params_that_skip_steps_match_torch_adamw():
    # a parameter without gradient for two steps falls two steps behind its group: its own bias correction
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(param_groups(ours_params), lr=1e-2)
    reference = torch.optim.AdamW(param_groups(torch_params), lr=1e-2)
    for optimizer, params in ((ours, ours_params), (reference, torch_params)):
        generator = torch.Generator().manual_seed(3)
        for step in range(1, 9):
            random_grads(params, generator, step)
            if step in (3, 4):
                params[1].grad = None
            optimizer.step()
    for p, q in zip(ours_params, torch_params):
        _assert_close_to_scale(p, q, 1e-6)  # as in the 100-step comparison


def test_non_contiguous_grads_give_the_bits_of_contiguous_ones(device):
    runs = []
    for layout in ("contiguous", "column-major"):
        params = make_params(device=device)
        optimizer = AdamW(param_groups(params), lr=1e-2)
        generator = torch.Generator().manual_seed(5)
        for step in range(1, 4):
            random_grads(params, generator, step)
            if layout == "column-major":
                for p in params[::3]:  # the two 2-D parameters
                    p.grad = p.grad.t().contiguous().t()
            with use_kernels("triton"):
                optimizer.step()
        runs.append((params, optimizer))
    assert_same_run(*runs[0], *runs[1])


def test_step_plan_survives_switching_kernels(device):
    # the Triton path builds its tables at its first step, after reference steps that moved the gradients
    kernels = {1: "reference", 2: "triton", 3: "reference", 4: "reference", 5: "triton", 6: "triton"}
    (cached, cached_opt), (rebuilt, rebuilt_opt) = run_with_and_without_plan(
        _make_adamw(8, None), _fresh_grads, 6, device=device, kernels=kernels.get)
    assert_same_run(cached, cached_opt, rebuilt, rebuilt_opt)


def test_step_plan_is_kept_until_the_set_of_gradients_changes():
    params = make_params()
    optimizer = AdamW(param_groups(params), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    grads_in_place(params, generator, 1)
    optimizer.step()
    plan = optimizer._plan
    grads_in_place(params, generator, 2)
    optimizer.param_groups[0]["lr"] = 5e-3
    optimizer.step()
    random_grads(params, generator, 3)  # reallocated: only the gradient addresses change
    optimizer.step()
    assert optimizer._plan is plan
    params[1].grad = None
    optimizer.step()
    assert optimizer._plan is not plan
