"""Fuzz audit 4: the torch.optim.Optimizer contract of AdamW and PagedAdamW (groups, schedulers, missing gradients,
closures, hooks, copies and checkpoints), live against torch.optim.AdamW."""

import copy
import io
import pickle
import random

import pytest
import torch

from nf4lora.kernels import use_kernels
from nf4lora.optim.adamw import AdamW
from nf4lora.optim.paged_adamw import PagedAdamW

OPTIMIZERS = [AdamW, lambda *a, **k: PagedAdamW(*a, page_bytes=2048, **k)]
SCHEDULERS = {
    "lambda": lambda opt, lrs: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step),
    "cosine": lambda opt, lrs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
    "onecycle": lambda opt, lrs: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lrs, total_steps=12),  # edits betas
}


def _random_problem(rng: random.Random, generator: torch.Generator):
    """Base tensors of random 2-d shapes, cut into 1-3 groups with their own lr/betas/eps/weight_decay."""
    base = [torch.randn(rng.randint(1, 40), rng.randint(1, 40), generator=generator) for _ in range(rng.randint(2, 4))]
    cuts = sorted(rng.sample(range(1, len(base)), rng.randint(0, min(2, len(base) - 1))))
    bounds = list(zip([0] + cuts, cuts + [len(base)]))
    hypers = [dict(lr=10 ** rng.uniform(-4, -1.5), betas=(rng.uniform(0.0, 0.95), rng.uniform(0.5, 0.999)),
                   eps=10 ** rng.uniform(-9, -4), weight_decay=rng.choice([0.0, 0.01, 0.3])) for _ in bounds]
    return base, bounds, hypers


def _build(make_optimizer, base, bounds, hypers, **kwargs):
    params = [torch.nn.Parameter(b.clone()) for b in base]
    groups = [{"params": params[lo:hi], **h} for (lo, hi), h in zip(bounds, hypers)]
    return params, make_optimizer(groups, **kwargs)


def _gradient_script(rng: random.Random, generator: torch.Generator, base, steps: int) -> list[list]:
    """Per step, a gradient or None (about 30 %) per parameter."""
    return [[torch.randn(b.shape, generator=generator) * 0.1 if rng.random() < 0.7 else None for b in base]
            for _ in range(steps)]


def _set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=["AdamW", "PagedAdamW"])
def test_fuzzed_groups_schedulers_and_missing_grads_track_torch(make_optimizer, seed):
    """Per-group hyperparameters, a scheduler changing them between steps, parameters without gradient in some
    steps (skipped: value, state and step count untouched) and a group added after steps, as torch.optim.AdamW."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    base, bounds, hypers = _random_problem(rng, generator)
    late = torch.randn(rng.randint(1, 300), generator=generator)
    ours, opt = _build(make_optimizer, base, bounds, hypers)
    theirs, ref = _build(torch.optim.AdamW, base, bounds, hypers)
    name = rng.choice(sorted(SCHEDULERS))
    schedulers = [SCHEDULERS[name](o, [h["lr"] * 3 for h in hypers]) for o in (opt, ref)]
    steps, add_at = 8, rng.randint(1, 6)
    script = _gradient_script(rng, generator, base + [late], steps)
    for step, grads in enumerate(script):
        if step == add_at:
            extra = dict(lr=2e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.05)
            ours.append(torch.nn.Parameter(late.clone()))
            theirs.append(torch.nn.Parameter(late.clone()))
            opt.add_param_group({"params": [ours[-1]], **extra})
            ref.add_param_group({"params": [theirs[-1]], **extra})
        _set_grads(ours, grads)
        _set_grads(theirs, grads)
        with use_kernels(rng.choice(["reference", "triton"])):
            opt.step()
        ref.step()
        for scheduler in schedulers if step < add_at else ():  # torch's schedulers do not follow added groups
            scheduler.step()
    saved, ref_saved = opt.state_dict()["state"], ref.state_dict()["state"]
    assert saved.keys() == ref_saved.keys()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"param {i} ({name})")
        if i in saved:
            assert saved[i]["step"] == ref_saved[i]["step"], i
            torch.testing.assert_close(saved[i]["exp_avg"], ref_saved[i]["exp_avg"], rtol=1e-5, atol=1e-7)
    for group, ref_group in zip(opt.param_groups, ref.param_groups):
        assert [group[k] for k in ("lr", "betas", "eps", "weight_decay")] == \
            [ref_group[k] for k in ("lr", "betas", "eps", "weight_decay")]


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("seed", range(2))
def test_checkpoint_into_fresh_optimizer_with_scheduler_continues_bit_exactly(optim_bits, seed):
    """state_dict() -> torch.save -> load_state_dict into a fresh AdamW or PagedAdamW mid-run, with OneCycleLR's
    state, continues the run bit for bit."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    base, bounds, hypers = _random_problem(rng, generator)
    script = _gradient_script(rng, generator, base, 8)
    make_a, make_b = rng.choice(OPTIMIZERS), rng.choice(OPTIMIZERS)

    def start(make_optimizer):
        params, opt = _build(make_optimizer, base, bounds, hypers, optim_bits=optim_bits, min_8bit_size=100)
        return params, opt, SCHEDULERS["onecycle"](opt, [h["lr"] * 3 for h in hypers])

    def run(params, opt, scheduler, steps):
        for grads in steps:
            _set_grads(params, grads)
            opt.step()
            scheduler.step()

    whole = start(make_a)
    run(*whole, script)
    first = start(make_a)
    run(*first, script[:4])
    buffer = io.BytesIO()
    torch.save({"opt": first[1].state_dict(), "sched": first[2].state_dict(),
                "params": [p.detach() for p in first[0]]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = start(make_b)
    with torch.no_grad():
        for p, value in zip(resumed[0], saved["params"]):
            p.copy_(value)
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    run(*resumed, script[4:])
    _assert_same(whole[0], whole[1], resumed[0], resumed[1])


def _assert_same(a_params, a_opt, b_params, b_opt) -> None:
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
    a, b = a_opt.state_dict(), b_opt.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["state"][index][name]), (index, name)
    assert a["param_groups"] == b["param_groups"]


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=["AdamW", "PagedAdamW"])
def test_copied_optimizer_mid_run_continues_bit_exactly(make_optimizer, optim_bits, copier):
    """copy.deepcopy / pickling of a model and its optimizer mid-run (torch's Optimizer supports both) gives an
    optimizer that continues as the original would, and leaves the original alone. Before: the copy lost the
    step plan and the 8-bit settings, and its first step raised AttributeError '_plan'."""
    rng, generator = random.Random(optim_bits), torch.Generator().manual_seed(optim_bits)
    base, bounds, hypers = _random_problem(rng, generator)
    base.append(torch.randn(130, generator=generator))  # 8-bit states above min_8bit_size
    bounds[-1] = (bounds[-1][0], len(base))
    script = _gradient_script(rng, generator, base, 6)
    params, opt = _build(make_optimizer, base, bounds, hypers, optim_bits=optim_bits, min_8bit_size=100)
    for grads in script[:3]:
        _set_grads(params, grads)
        opt.step()
    twin_params, twin = copier((params, opt))
    assert twin.optim_bits == optim_bits and twin.min_8bit_size == 100
    for grads in script[3:]:
        for ps, o in ((params, opt), (twin_params, twin)):
            _set_grads(ps, grads)
            o.step()
    _assert_same(params, opt, twin_params, twin)


@pytest.mark.parametrize("make_optimizer", [torch.optim.AdamW, *OPTIMIZERS], ids=["torch", "AdamW", "PagedAdamW"])
def test_state_dict_hooks_run_as_torch_runs_them(make_optimizer):
    """register_state_dict_pre/post_hook and register_load_state_dict_pre/post_hook (torch's base class) are run,
    and a hook's returned dict is used. Before: nf4lora's AdamW registered them and silently never ran them."""
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = make_optimizer(params, lr=1e-3)
    params[0].grad = torch.randn(4, 3)
    opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save post") or {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load pre") or {k: v for k, v in sd.items() if k != "tag"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    saved = opt.state_dict()
    assert saved["tag"] == 1
    opt.load_state_dict(saved)  # 'tag' would be refused without the pre hook
    assert calls == ["save pre", "save post", "load pre", "load post"]


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=["AdamW", "PagedAdamW"])
def test_step_hooks_closure_and_zero_grad_follow_torch(make_optimizer):
    """Step pre/post hooks run; step(closure) runs the closure with grad enabled and returns its loss; zero_grad
    sets gradients to None or zeros, and a zeroed gradient still counts a step (as torch)."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = make_optimizer([p])
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and calls == ["pre", "post"]
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(5))
    opt.step()
    assert opt.state[p]["step"] == 2
    opt.zero_grad()
    assert p.grad is None
    opt.step()
    assert opt.state[p]["step"] == 2


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=["AdamW", "PagedAdamW"])
@pytest.mark.parametrize("build, error, match", [
    (lambda: [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], TypeError, "complex64"),
    (lambda: [torch.zeros(3, dtype=torch.int32)], TypeError, "int32"),
    (lambda: [{"params": [p := torch.nn.Parameter(torch.randn(3))]}, {"params": [p]}], ValueError,
     "already param 0 of param group 0"),
    (lambda: [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": torch.tensor(1e-3)}], TypeError,
     r"lr must be a float >= 0, got tensor"),
])
def test_unsupported_parameters_and_groups_are_refused_in_one_line(make_optimizer, build, error, match):
    """Complex and integer parameters, a parameter in two groups (torch refuses too) and a tensor lr (torch takes
    it; documented here as floats only) are refused in one line naming the bad value."""
    with pytest.raises(error, match=match) as raised:
        make_optimizer(build())
    assert "\n" not in str(raised.value)
