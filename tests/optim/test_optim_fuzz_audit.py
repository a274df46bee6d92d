"""Fuzz audit of AdamW / PagedAdamW: param groups listed wrongly, Adam's L2 state dicts, non-int sizes, sparse
gradients named; seeded fuzz of odd shapes (scalars, empty, not multiples of 256) against torch.optim.AdamW and of
mid-run checkpoints across optimizers."""

import copy
import io
import random

import pytest
import torch
from optim_helpers import assert_same_run

from nf4lora.optim import AdamW, PagedAdamW

OPTIMIZERS = [AdamW, PagedAdamW]


def _param(*shape):
    return torch.nn.Parameter(torch.randn(shape))


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_group_without_params_is_refused_in_one_line(optimizer_class):
    # torch's add_param_group raised KeyError('params')
    with pytest.raises(ValueError, match=r"^param group has keys \['lr'\]; expected 'params' \(a parameter or a "
                                         r"list of parameters\) among them$"):
        optimizer_class([{"params": [_param(3)]}, {"lr": 1e-3}])
    with pytest.raises(TypeError, match=r"^param group 'params' must be a parameter or a list of parameters, "
                                        r"got NoneType$"):
        optimizer_class([{"params": None}])


def test_parameter_listed_twice_in_a_group_is_refused():
    # torch only warns, and the fused step updated the parameter twice with one step count: after 3 steps of
    # gradient 0.5 at lr 0.1 it held 0.347 where torch.optim.AdamW (two step counts) holds 0.395
    p = _param(3)
    with pytest.raises(ValueError, match=r"^param 1 of param group 0 \(shape \(3,\)\) is already param 0 of param "
                                         r"group 0; each parameter may be listed once$"):
        AdamW([p, p], lr=0.1)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_parameter_listed_in_two_groups_is_named(optimizer_class):
    params = [_param(3), _param(2, 5)]
    optimizer = optimizer_class([{"params": params}])
    with pytest.raises(ValueError, match=r"^param 0 of param group 1 \(shape \(2, 5\)\) is already param 1 of "
                                         r"param group 0; each parameter may be listed once$"):
        optimizer.add_param_group({"params": (p for p in params[1:])})  # a generator, as model.parameters()
    assert len(optimizer.param_groups) == 1


def test_generator_of_params_in_a_group_still_works():
    params = [_param(4), _param(3)]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = AdamW([{"params": (p for p in params), "lr": 1e-2}])
    reference = torch.optim.AdamW([{"params": reference_params, "lr": 1e-2}])
    for p, q in zip(params, reference_params):
        p.grad = q.grad = torch.ones_like(p)
    ours.step()
    reference.step()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(params, reference_params))


def _torch_adam_state_dict(weight_decay):
    p = _param(4, 3)
    adam = torch.optim.Adam([p], lr=1e-2, weight_decay=weight_decay)
    p.grad = torch.randn(4, 3)
    adam.step()
    return p, adam


def test_adam_l2_state_dict_is_refused():
    # torch.optim.Adam adds weight_decay * p to the gradient (L2); loading its dict was silently taken as AdamW's
    # decoupled decay, another update
    p, adam = _torch_adam_state_dict(weight_decay=0.01)
    ours = AdamW([torch.nn.Parameter(p.detach().clone())])
    with pytest.raises(ValueError, match=r"^decoupled_weight_decay=False \(Adam's L2 weight decay, weight_decay=0.01\) "
                                         r"is not supported by nf4lora's AdamW; valid: decoupled_weight_decay=True, "
                                         r"or weight_decay=0$"):
        ours.load_state_dict(adam.state_dict())
    assert ours.param_groups[0]["weight_decay"] == 0.01 and "decoupled_weight_decay" not in ours.param_groups[0]


def test_adam_state_dict_without_weight_decay_loads_and_matches_torch():
    p, adam = _torch_adam_state_dict(weight_decay=0.0)  # Adam without decay is AdamW without decay
    q = torch.nn.Parameter(p.detach().clone())
    ours = AdamW([q])
    ours.load_state_dict(adam.state_dict())
    for _ in range(3):
        grad = torch.randn(4, 3)
        p.grad, q.grad = grad.clone(), grad.clone()
        adam.step()
        ours.step()
    assert torch.allclose(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"min_8bit_size": "4096"}, r"^min_8bit_size must be an int >= 0, got '4096'$"),
    ({"min_8bit_size": None}, r"^min_8bit_size must be an int >= 0, got None$"),
    ({"page_bytes": "8M"}, r"^page_bytes must be >= 2048 \(the state of 256 elements\), got '8M'$"),
    ({"gpu_budget_bytes": "1G"}, r"^gpu_budget_bytes must be None or >= 0, got '1G'$"),
])
def test_non_int_sizes_are_refused_in_one_line(kwargs, match):
    # these raised "'<' not supported between instances of 'str' and 'int'", naming neither argument nor value
    with pytest.raises(TypeError, match=match):
        PagedAdamW([_param(3)], **kwargs)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_sparse_gradient_refusal_names_the_parameter(optimizer_class):
    params = [_param(3), _param(4)]
    params[0].grad = torch.ones(3)
    params[1].grad = torch.ones(4).to_sparse()
    with pytest.raises(ValueError, match=r"^param 1 \(shape \(4,\)\) has a sparse gradient; AdamW does not support "
                                         r"sparse gradients, valid: dense ones$"):
        optimizer_class(params).step()


# ----------------------------------------------------------------------------------------------------------------
# Seeded fuzz: shapes and group settings earlier tests do not reach
# ----------------------------------------------------------------------------------------------------------------

_FUZZ_SHAPES = [(), (1,), (3,), (255,), (257,), (0,), (2, 0), (7, 37), (513,)]


def _fuzz_problem(seed):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    shapes = [rng.choice(_FUZZ_SHAPES) for _ in range(rng.randint(2, 5))]
    values = [torch.randn(shape, generator=generator) for shape in shapes]
    cut = rng.randint(1, len(shapes) - 1)
    second = {"lr": rng.choice([0.0, 3e-3, 0.1]), "betas": rng.choice([(0.0, 0.9), (0.5, 0.0), (0.99, 0.9999)]),
              "eps": rng.choice([1e-8, 1e-3]), "weight_decay": rng.choice([0.0, 0.5])}
    return rng, generator, values, lambda params: [{"params": params[:cut]}, {"params": params[cut:], **second}]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_fuzzed_groups_and_shapes_track_torch_adamw(optimizer_class, seed):
    rng, generator, values, groups = _fuzz_problem(seed)
    ours_params = [torch.nn.Parameter(v.clone()) for v in values]
    torch_params = [torch.nn.Parameter(v.clone()) for v in values]
    kwargs = {"page_bytes": 2048, "gpu_budget_bytes": 2500} if optimizer_class is PagedAdamW else {}
    ours = optimizer_class(groups(ours_params), lr=1e-2, weight_decay=0.05, **kwargs)
    reference = torch.optim.AdamW(groups(torch_params), lr=1e-2, weight_decay=0.05, foreach=False)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (ours, reference)]
    for _ in range(25):
        set_to_none = rng.random() < 0.5
        ours.zero_grad(set_to_none=set_to_none)
        reference.zero_grad(set_to_none=set_to_none)
        for p, q in zip(ours_params, torch_params):
            if rng.random() < 0.2:
                continue  # no gradient, or a zero one left by zero_grad(set_to_none=False)
            grad = torch.randn(p.shape, generator=generator) * rng.choice([1.0, 1e-6, 1e3, 0.0])
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        for scheduler in schedulers:
            scheduler.step()
        for p, q in zip(ours_params, torch_params):
            if p.numel():  # float32, one rounding per op in another order: ulps of the parameter or of the step
                assert (p - q).abs().max().item() <= 1e-6 * max(q.abs().max().item(), 0.1)
            state = ours.state.get(p)
            if q in reference.state:
                assert state["step"] == reference.state[q]["step"].item()
            else:
                assert not state


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_fuzzed_checkpoint_resumes_bit_exactly_across_optimizers(optim_bits, seed):
    # 8-bit states on every size (min_8bit_size=0): scalars, empty tensors, a block's tail; saved by one
    # optimizer, resumed by the other with other pages
    rng, generator, values, groups = _fuzz_problem(seed)
    grads = [[None if rng.random() < 0.2 else torch.randn(v.shape, generator=generator) for v in values]
             for _ in range(6)]
    classes = [(AdamW, {}), (PagedAdamW, {"page_bytes": 2048, "gpu_budget_bytes": 0})]
    rng.shuffle(classes)

    def run(optimizer, params, steps):
        for step in steps:
            for p, grad in zip(params, grads[step]):
                p.grad = None if grad is None else grad.clone()
            optimizer.step()

    def fresh(params, index):
        optimizer_class, kwargs = classes[index]
        return optimizer_class(groups(params), lr=1e-2, optim_bits=optim_bits, min_8bit_size=0, **kwargs)

    params = [torch.nn.Parameter(v.clone()) for v in values]
    optimizer = fresh(params, 0)
    run(optimizer, params, range(3))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run(optimizer, params, range(3, 6))
    buffer.seek(0)
    resumed = fresh(resumed_params, 1)
    resumed.load_state_dict(copy.deepcopy(torch.load(buffer, weights_only=True)))
    run(resumed, resumed_params, range(3, 6))
    assert_same_run(params, optimizer, resumed_params, resumed)
