"""Random problems shared by the optimizer tests."""

import torch

from nf4lora.kernels import use_kernels
from nf4lora.nf4.blockwise import quantize_blockwise
from nf4lora.nf4.codebook import dynamic_map
from nf4lora.optim.adamw import state_layout, state_views
from nf4lora.optim.fused_adamw import QBLOCK, Segment

# ragged on purpose: sizes that are not multiples of 256 (8-bit blocks) or of a page, one below min_8bit_size
SHAPES = [(33, 170), (5000,), (3,), (70, 130)]


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(device=device, dtype=dtype)) for s in shapes]


def param_groups(params, **second_group) -> list[dict]:
    """Two groups, the second with its own lr and weight decay (or `second_group`'s overrides)."""
    overrides = {"lr": 3e-3, "weight_decay": 0.1, **second_group}
    return [{"params": params[:2]}, {"params": params[2:], **overrides}]


def random_grads(params, generator: torch.Generator, step: int) -> None:
    """Gaussian gradients; at step 1 the first parameter's gradient is zero (as LoRA's A is behind a zero B)."""
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=generator) * 0.1
        if step == 1 and i == 0:
            g.zero_()
        p.grad = g.to(device=p.device, dtype=p.dtype)


def run_steps(optimizer, params, steps: int, seed: int = 1, start: int = 1) -> None:
    """`steps` optimizer steps on `random_grads`, numbered from `start` (so a resumed run sees the same grads)."""
    generator = torch.Generator().manual_seed(seed * 1000 + start)
    for step in range(start, start + steps):
        random_grads(params, generator, step)
        optimizer.step()


def assert_same_run(a_params, a_opt, b_params, b_opt) -> None:
    """The two runs' parameters and states are equal bit for bit."""
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
    a_state, b_state = a_opt.state_dict()["state"], b_opt.state_dict()["state"]
    assert a_state.keys() == b_state.keys()
    for index in a_state:
        for name, value in a_state[index].items():
            assert torch.equal(value.cpu(), b_state[index][name].cpu()), (index, name)


def grads_in_place(params, generator: torch.Generator, step: int) -> None:
    """`random_grads`' values written into the existing gradients (as after `zero_grad(set_to_none=False)`)."""
    for p in params:
        g = (torch.randn(p.shape, generator=generator) * 0.1).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def run_with_and_without_plan(make_optimizer, script, steps: int, device="cpu", kernels=lambda step: "triton"):
    """Two identical runs of `steps` steps of `script(step, params, optimizer, generator)` (which sets the grads and
    may change the optimizer), then `optimizer.step()` under `use_kernels(kernels(step))`: the first keeps the
    optimizer's step plan from step to step, the second drops it before every step, so that it rebuilds
    everything. Returns (params, optimizer) of both.
    """
    runs = []
    for keep_plan in (True, False):
        params = make_params(device=device)
        optimizer = make_optimizer(params)
        generator = torch.Generator().manual_seed(7)
        for step in range(1, steps + 1):
            script(step, params, optimizer, generator)
            if not keep_plan:
                optimizer._plan = None
            with use_kernels(kernels(step)):
                optimizer.step()
        runs.append((params, optimizer))
    return runs


def random_segments(layout, device, dtype, eight_bit: bool, seed: int = 0, zero_block: bool = False) -> list[Segment]:
    """AdamW segments over fresh parameters with random gradients and non-trivial states (two scalar rows,
    alternating), the same ones for the same seed. ``layout``: (parameter numel, segment start, segment numel) each;
    ``zero_block`` zeroes the first 256-element block of exp_avg where a segment is longer than 300 (8-bit: absmax
    0, index 0)."""
    g = torch.Generator().manual_seed(seed)
    segments = []
    for i, (total, start, n) in enumerate(layout):
        param = torch.randn(total, generator=g).to(device=device, dtype=dtype)
        grad = (torch.randn(total, generator=g) * 0.1).to(device=device, dtype=dtype)
        state = state_views(torch.zeros(state_layout(n, eight_bit)[1], dtype=torch.uint8, device=device), n,
                            eight_bit)
        m, v = torch.randn(n, generator=g) * 0.01, torch.rand(n, generator=g) * 1e-3
        if eight_bit:
            if zero_block and n > 300:
                m[:256] = 0.0
            for name, value, signed in (("1", m, True), ("2", v, False)):
                codes, absmax = quantize_blockwise(value, dynamic_map(signed), QBLOCK)
                state["state" + name].copy_(codes)
                state["absmax" + name].copy_(absmax)
        else:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        segments.append(Segment(param, grad, start, n, state, i % 2))
    return segments
