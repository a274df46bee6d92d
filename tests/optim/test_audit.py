"""Edge cases of AdamW / PagedAdamW a demanding user meets: bad input, checkpoints on disk, failed steps retried."""

import copy
import io

import pytest
import torch
from optim_helpers import assert_same_run, make_params, param_groups, run_steps

from nf4lora.kernels import use_kernels
from nf4lora.optim import AdamW, PagedAdamW
from nf4lora.optim import paged_adamw


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lr": "1e-3"}, TypeError, r"^lr must be a float >= 0, got '1e-3'$"),  # a YAML "1e-3" is a string
    ({"lr": float("inf")}, ValueError, r"^lr must be a float >= 0, got inf$"),
    ({"betas": 0.9}, TypeError, r"^betas must be two floats in \[0, 1\), got 0.9$"),
    ({"betas": ("0.9", 0.999)}, TypeError, r"^betas must be two floats in \[0, 1\), got \('0.9', 0.999\)$"),
    ({"eps": None}, TypeError, r"^eps must be a float > 0, got None$"),
    ({"eps": 0.0}, ValueError, r"^eps must be a float > 0, got 0.0$"),  # 0 / 0 wherever a gradient is zero
    ({"weight_decay": "0.1"}, TypeError, r"^weight_decay must be a float >= 0, got '0.1'$"),
])
def test_bad_hyperparameters_raise_one_line_naming_value_and_range(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamW(make_params(), **kwargs)


def test_eps_zero_would_turn_zero_gradients_into_nan():
    # why eps must be > 0: torch.optim.AdamW with eps=0 makes NaN of every element whose gradient is still zero
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.zeros(4)
    torch.optim.AdamW([p], eps=0.0).step()
    assert p.isnan().all()


@pytest.mark.parametrize("bad_group,error", [
    (lambda params: {"params": params, "lr": -1.0}, ValueError),
    (lambda params: {"params": params, "betas": (0.9, 1.0)}, ValueError),
    (lambda params: {"params": [torch.zeros(3, dtype=torch.int64)]}, TypeError),
])
def test_refused_param_group_leaves_the_optimizer_as_it_was(bad_group, error):
    params, reference_params = make_params(), make_params()
    optimizer = AdamW(params[:2], lr=1e-2)
    with pytest.raises(error):
        optimizer.add_param_group(bad_group(params[2:]))
    assert len(optimizer.param_groups) == 1
    reference = torch.optim.AdamW(reference_params[:2], lr=1e-2)
    run_steps(optimizer, params[:2], 2)
    run_steps(reference, reference_params[:2], 2)
    for p, q in zip(params[:2], reference_params[:2]):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def _edit(path, value=None):
    """A state-dict mutation: set the item at `path` (keys from the top) to `value`, or delete it when None."""
    def mutate(state_dict):
        *keys, last = path
        target = state_dict
        for key in keys:
            target = target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
        return state_dict
    return mutate


@pytest.mark.parametrize("mutate,error,match", [
    (lambda sd: [], TypeError, r"^state dict must be a dict with 'state' and 'param_groups', got list$"),
    (_edit(("param_groups",)), ValueError, r"^state dict has keys \['state'\]; expected \['param_groups', 'state'\]$"),
    (_edit(("param_groups", 0), [0, 1]), TypeError,
     r"^param group 0 of the state dict must be a dict with 'params' \(a list of indices\), got list$"),
    (_edit(("param_groups", 1, "params")), TypeError, r"^param group 1 of the state dict .* got keys \['betas'"),
    (_edit(("state", 0), torch.zeros(3)), TypeError, r"^state of param 0 must be a dict of tensors, got Tensor$"),
    (_edit(("state", 0, "exp_avg"), "zeros"), TypeError, r"^state 'exp_avg' of param 0 must be a tensor, got str$"),
    (_edit(("state", 0, "step"), torch.tensor(float("nan"))), ValueError,
     r"^state of param 0 has step nan; expected a whole number >= 0$"),
    (_edit(("state", 0, "step"), torch.tensor(-2.0)), ValueError,
     r"^state of param 0 has step -2.0; expected a whole number >= 0$"),
    (lambda sd: {**sd, "state": {"0": sd["state"][0]}}, ValueError,  # keys as strings, as after a JSON round trip
     r"^state dict has state for param '0', which no param group lists$"),
])
def test_malformed_state_dict_is_refused_in_one_line(mutate, error, match):
    params = make_params()
    optimizer = AdamW(param_groups(params), lr=1e-2)
    run_steps(optimizer, params, 1)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(mutate(copy.deepcopy(before)))
    for name, value in before["state"][0].items():  # a refused dict leaves the optimizer as it was
        assert torch.equal(optimizer.state_dict()["state"][0][name], value)


@pytest.mark.parametrize("optimizer_class", [AdamW, PagedAdamW])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_state_dict_survives_torch_save_and_resumes_bit_exactly(optimizer_class, optim_bits):
    # the trainer's checkpoint: torch.save of state_dict(), torch.load(weights_only=True) into a fresh optimizer
    params = make_params()
    optimizer = optimizer_class(param_groups(params), lr=1e-2, optim_bits=optim_bits)
    run_steps(optimizer, params, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run_steps(optimizer, params, 2, start=4)
    buffer.seek(0)
    resumed = optimizer_class(param_groups(resumed_params), optim_bits=optim_bits)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run_steps(resumed, resumed_params, 2, start=4)
    assert_same_run(params, optimizer, resumed_params, resumed)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("optimizer_class", [AdamW, PagedAdamW])
def test_parameter_resized_under_its_state_is_refused(kernels, optimizer_class):
    # the kernel would read and write the old number of elements: past the end of the new storage
    params = make_params()
    optimizer = optimizer_class(params, lr=1e-2)
    run_steps(optimizer, params, 1)
    params[1].data = params[1].data[:4000].clone()
    params[1].grad = torch.randn(4000)
    before = [p.detach().clone() for p in params]
    with use_kernels(kernels), pytest.raises(ValueError, match=r"^param 1 has 4000 elements, its optimizer state 5000"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def _fails_once(function, error):
    calls = []

    def wrapper(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise error
        return function(*args, **kwargs)
    return wrapper


def test_paged_step_retried_after_out_of_memory_gives_adamw_bits(monkeypatch):
    # the slots' allocation fails: the docstring promises every parameter unchanged, so a retry is the same step
    params, paged_params = make_params(), make_params()
    adamw = AdamW(param_groups(params), lr=1e-2)
    paged = PagedAdamW(param_groups(paged_params), lr=1e-2, gpu_budget_bytes=0, page_bytes=4096)
    for optimizer, run_params in ((adamw, params), (paged, paged_params)):
        run_steps(optimizer, run_params, 2)
    run_steps(adamw, params, 1, start=3)
    paged._plan = None  # the next step lays out its streaming again, as after an eviction
    monkeypatch.setattr(paged_adamw, "_Stream",
                        _fails_once(paged_adamw._Stream, torch.cuda.OutOfMemoryError("out of memory (simulated)")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_steps(paged, paged_params, 1, start=3)
    paged.step()  # the same gradients, retried
    assert_same_run(params, adamw, paged_params, paged)


def test_adamw_step_retried_after_state_allocation_fails_gives_torch_result(monkeypatch):
    params = make_params()
    reference_params = make_params()
    optimizer = AdamW(params, lr=1e-2)
    reference = torch.optim.AdamW(reference_params, lr=1e-2)
    monkeypatch.setattr(optimizer, "_init_state",
                        _fails_once(optimizer._init_state, torch.cuda.OutOfMemoryError("out of memory (simulated)")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_steps(optimizer, params, 1)
    optimizer.step()
    run_steps(reference, reference_params, 1)
    for p, q in zip(params, reference_params):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert all(entry["step"] == 1 for entry in optimizer.state_dict()["state"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer_class", [AdamW, PagedAdamW])
def test_parameter_moved_to_another_device_under_its_state_is_refused(optimizer_class):
    # the kernel would get the CPU state's addresses: an illegal memory access that kills the CUDA context
    params = make_params()
    optimizer = optimizer_class(params, lr=1e-2)
    run_steps(optimizer, params, 1)
    optimizer.zero_grad()
    for p in params:
        p.data = p.data.cuda()
    params[0].grad = torch.randn(params[0].shape, device="cuda")
    with pytest.raises(ValueError, match=r"^param 0 is on cuda:0, its optimizer state on cpu"):
        optimizer.step()
