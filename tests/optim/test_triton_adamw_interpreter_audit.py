"""The Triton AdamW kernel (``nf4lora.optim.triton_adamw``) under the interpreter on what tests/optim leaves to the
GPU or to the reference (helper audit): float16 parameters, and segments that are slices of larger parameters."""

import pytest
import torch

from nf4lora.kernels import use_kernels
from nf4lora.optim.fused_adamw import adamw_update, step_scalars
from optim_helpers import random_segments

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on masked-off lanes

SCALARS = [step_scalars(1e-2, 0.9, 0.999, 1e-8, 0.05, 7), step_scalars(3e-3, 0.8, 0.99, 1e-6, 0.0, 1)]
# (parameter numel, segment start, segment numel): whole parameters of 1, 300 and 5 x 2048 + 3 elements (several
# programs, a ragged last one) and two slices that start on a 256-element block, as PagedAdamW's pages do, with
# untouched elements before and after them. Five segments: the kernel's segment search takes three steps.
LAYOUT = [(1, 0, 1), (3000, 512, 2049), (300, 0, 300), (5 * 2048 + 3, 0, 5 * 2048 + 3), (4000, 2048, 1000)]


def _segments(dtype: torch.dtype, eight_bit: bool, seed: int):
    """Fresh parameters, gradients and non-trivial states for ``LAYOUT`` (the same ones for the same seed)."""
    return random_segments(LAYOUT, "cpu", dtype, eight_bit, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 parameters: the gpu-marked optim test
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
def test_triton_adamw_updates_exactly_its_slices_as_the_reference_does(dtype, eight_bit):
    """Parameters, states and the elements outside each slice bit for bit as the reference leaves them (the
    module's slice test runs in auto mode, which on CPU tensors takes the reference, and its kernel test fp32 only)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs every run
    triton_segments, reference_segments = _segments(dtype, eight_bit, seed), _segments(dtype, eight_bit, seed)
    before = [seg.param.clone() for seg in triton_segments]
    with use_kernels("triton"):
        adamw_update(triton_segments, SCALARS)
    with use_kernels("reference"):
        adamw_update(reference_segments, SCALARS)
    for seg, ref, old in zip(triton_segments, reference_segments, before):
        end = seg.start + seg.numel
        assert torch.equal(seg.param, ref.param), (seed, seg.start, seg.numel)
        assert torch.equal(seg.param[: seg.start], old[: seg.start]) and torch.equal(seg.param[end:], old[end:])
        for name in seg.state:
            assert torch.equal(seg.state[name], ref.state[name]), (seed, name)
