"""Fuzz audit 3 of AdamW / PagedAdamW: huge gradients against torch.optim.AdamW and bitsandbytes' CPU AdamW8bit,
state dicts whose step counts, tensors or param indices cannot be loaded (refused in one line before any state is
touched), and `evict` sizes that are not ints."""

import copy

import pytest
import torch

from nf4lora.kernels import use_kernels
from nf4lora.optim import AdamW, PagedAdamW

OPTIMIZERS = [AdamW, PagedAdamW]


def _twin_params(numel: int, seed: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(numel, generator=generator)
    return torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone()), generator


def _huge_gradient_run(ours, theirs, ours_param, their_param, generator, huge: float) -> None:
    """Four steps of gradients ~0.1, the second with elements of magnitude `huge` at random places."""
    for step in range(4):
        grad = torch.randn(ours_param.shape, generator=generator) * 0.1
        if step == 1:
            grad[torch.randperm(grad.numel(), generator=generator)[:40]] = huge
        ours_param.grad, their_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_gradients_whose_square_overflows_float32_still_step_like_torch(kernels):
    # v gained (g * g) * (1 - beta2): g * g is inf from |g| = 1.8e19, so those elements stopped moving, where
    # torch's addcmul ((1 - beta2) * g) * g keeps v finite up to |g| = 5.8e20 and moves them by about lr
    huge = torch.empty(()).uniform_(2e19, 5e20).item()
    ours_param, torch_param, generator = _twin_params(700, seed=torch.randint(1 << 30, ()).item())
    ours = AdamW([ours_param], lr=1e-2)
    reference = torch.optim.AdamW([torch_param], lr=1e-2, foreach=False)
    with use_kernels(kernels):
        _huge_gradient_run(ours, reference, ours_param, torch_param, generator, huge)
    assert torch.isfinite(torch_param).all()
    assert (ours_param - torch_param).abs().max().item() <= 1e-6 * torch_param.abs().max().item()


def test_8bit_gradients_whose_square_overflows_float32_do_not_turn_the_tensor_nan():
    # the inf second moment made its block's absmax inf, and dequantizing 0 * inf made NaN of every element of
    # every such block; bitsandbytes' CPU AdamW8bit (addcmul) stays finite and so must we
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    huge = torch.empty(()).uniform_(2e19, 5e20).item()
    ours_param, bnb_param, generator = _twin_params(5000, seed=torch.randint(1 << 30, ()).item())
    ours = AdamW([ours_param], lr=1e-2, optim_bits=8)
    theirs = bnb_optim.AdamW8bit([bnb_param], lr=1e-2)
    _huge_gradient_run(ours, theirs, ours_param, bnb_param, generator, huge)
    assert torch.isfinite(bnb_param).all()
    assert torch.isfinite(ours_param).all()
    assert (~torch.isclose(ours_param, bnb_param, atol=1e-4, rtol=1e-2)).sum().item() <= 5


def _stepped(optimizer_class, **kwargs):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(300))]
    optimizer = optimizer_class(params, lr=1e-2, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
@pytest.mark.parametrize("step,error,match", [
    (None, TypeError, r"^state of param 1 has step None; expected a whole number >= 0$"),
    ("3", TypeError, r"^state of param 1 has step '3'; expected a whole number >= 0$"),  # was taken as 3
    (True, TypeError, r"^state of param 1 has step True; expected a whole number >= 0$"),  # was taken as 1
    (torch.tensor([1.0, 2.0]), TypeError,
     r"^state of param 1 has step tensor\(\[1\., 2\.\]\); expected a whole number >= 0$"),
    (torch.tensor([4.5]), ValueError, r"^state of param 1 has step 4.5; expected a whole number >= 0$"),
])
def test_saved_step_that_is_not_a_count_is_refused_in_one_line(optimizer_class, step, error, match):
    optimizer = _stepped(optimizer_class)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    checkpoint["state"][1]["step"] = step
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(checkpoint)


def test_saved_step_as_a_one_element_tensor_or_int_loads():
    optimizer = _stepped(AdamW)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    checkpoint["state"][0]["step"], checkpoint["state"][1]["step"] = torch.tensor([7.0]), 5
    optimizer.load_state_dict(checkpoint)
    assert [entry["step"].item() for entry in optimizer.state_dict()["state"].values()] == [7.0, 5.0]


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
@pytest.mark.parametrize("optim_bits,name,tensor,match", [
    (32, "exp_avg", lambda t: torch.empty(t.shape, device="meta"), "is a meta tensor"),
    (32, "exp_avg_sq", lambda t: t.to_sparse(), "is a torch.sparse_coo tensor"),
    (8, "state2", lambda t: torch.empty(t.shape, dtype=torch.uint8, device="meta"), "is a meta tensor"),
])
def test_state_tensor_without_data_is_refused_before_the_states_are_cleared(optimizer_class, optim_bits, name,
                                                                            tensor, match):
    # a meta tensor (a checkpoint loaded under torch.device("meta")) failed in the copy after the optimizer's states
    # were cleared: param 1's state was lost (zeros, step kept) and param 0 already held the incoming state
    optimizer = _stepped(optimizer_class, optim_bits=optim_bits, min_8bit_size=256)
    before = copy.deepcopy(optimizer.state_dict())
    checkpoint = copy.deepcopy(before)
    checkpoint["state"][0] = {key: torch.zeros_like(value) for key, value in checkpoint["state"][0].items()}
    checkpoint["state"][1][name] = tensor(checkpoint["state"][1][name])
    with pytest.raises(ValueError, match=rf"^state {name!r} of param 1 {match}; expected a dense tensor with data$"):
        optimizer.load_state_dict(checkpoint)
    after = optimizer.state_dict()["state"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), (index, key)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_state_dict_listing_a_param_index_twice_is_refused(optimizer_class):
    # saved params [0, 0]: param 1 silently got param 0's state and param 0 none
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))]
    optimizer = optimizer_class(params, lr=1e-2)
    params[0].grad = torch.randn(5)
    optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    checkpoint["param_groups"][0]["params"] = [0, 0]
    with pytest.raises(ValueError, match=r"^param group 0 of the state dict lists param 0 again; each index may be "
                                         r"listed once$"):
        optimizer.load_state_dict(checkpoint)
    assert params[0] in optimizer.state and not optimizer.state.get(params[1])


@pytest.mark.parametrize("nbytes", ["1", None, 1.5, True])
def test_evict_size_that_is_not_an_int_is_refused_in_one_line(nbytes):
    # "1" and None raised "'<' not supported between instances of 'str' and 'int'"; 1.5 and True were taken
    optimizer = _stepped(PagedAdamW)
    resident = optimizer.resident_bytes
    with pytest.raises(TypeError, match=rf"^evict's nbytes must be an int >= 0, got {nbytes!r}$".replace(".", r"\.")):
        optimizer.evict(nbytes)
    assert optimizer.resident_bytes == resident and optimizer.budget is None
