"""Random problems shared by the optimizer tests."""

import torch

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
