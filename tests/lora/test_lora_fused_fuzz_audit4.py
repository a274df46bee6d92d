"""Fuzz audit of the fused LoRA node (``lora_linear``), ``lora_add`` and the layer that picks between them, live
against float64 autograd on the plain formula and peft 0.21's ``lora.Linear``: double backward, operand shapes, and
a trainable dense base weight."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_helpers import rel_err
from nf4lora.lora import LoraConfig, LoraLinear
from nf4lora.lora.functional import lora_add
from nf4lora.lora.fused import lora_linear

M, K, N, R = 4, 6, 5, 2


def _plain(x, x_lora, w, bias, a, b, scaling):
    """The formula in plain autograd ops: ``x @ W.T + bias + scaling * x_lora @ A.T @ B.T``."""
    y = x @ w.t() + scaling * (x_lora @ a.t()) @ b.t()
    return y if bias is None else y + bias


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``rel_err``, 0 for empty tensors (a batch of no rows)."""
    return rel_err(actual, expected) if expected.numel() else 0.0


def _fused(x, x_lora, w, bias, a, b, scaling):
    return lora_linear(x, x_lora, w, bias, a, b, scaling)


def _unfused(x, x_lora, w, bias, a, b, scaling):
    return lora_add(_plain(x, x, w, bias, a, b, 0.0), x_lora, a, b, scaling)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([(1,), (3,), (2, 3), (0,)]), k=st.integers(1, 12), n=st.integers(1, 12),
    r=st.sampled_from([1, 3, 14]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    lora_in_fp32=st.booleans(), trainable=st.fixed_dictionaries({k: st.booleans() for k in ("x", "a", "b", "bias")}),
    bias=st.booleans(), shared=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_lora_linear_gives_the_float64_formula_s_gradients_only_to_trainable_inputs_in_their_dtypes(
    lead, k, n, r, dtype, lora_in_fp32, trainable, bias, shared, strided, seed
):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = torch.float32 if lora_in_fp32 else dtype
    x = torch.randn(*lead, 2 * k if strided else k, generator=g).to(dtype)[..., :: 2 if strided else 1]
    x_lora = x if shared else torch.randn(*lead, k, generator=g).to(dtype)
    inputs = {
        "x": x, "x_lora": x_lora, "w": (torch.randn(n, k, generator=g) / k**0.5).to(dtype),
        "bias": torch.randn(n, generator=g).to(dtype) if bias else None,
        "a": torch.randn(r, k, generator=g).to(lora_dtype), "b": torch.randn(n, r, generator=g).to(lora_dtype),
    }
    grad_y = torch.randn(*lead, n, generator=g).to(dtype)
    ours, ref = {}, {}
    for leaves, cast in ((ours, lambda t: t), (ref, lambda t: t.double())):
        for name, t in inputs.items():
            requires = trainable.get(name, trainable["x"]) if name != "w" else False
            leaves[name] = None if t is None else cast(t).detach().requires_grad_(requires)
        if shared:
            leaves["x_lora"] = leaves["x"]
    # the float64 reference multiplies by the A and B that the node casts to the compute dtype
    rounded = {k: ref[k] + (ref[k].detach().to(dtype).double() - ref[k].detach()) for k in ("a", "b")}
    y = lora_linear(*(ours[k] for k in ("x", "x_lora", "w", "bias", "a", "b")), 0.75)
    y_ref = _plain(ref["x"], ref["x_lora"], ref["w"], ref["bias"], rounded["a"], rounded["b"], 0.75)
    assert y.dtype == dtype and y.shape == (*lead, n)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert _err(y, y_ref) < tol
    if not y_ref.requires_grad:
        assert not y.requires_grad
        return
    y.backward(grad_y)
    y_ref.backward(grad_y.double())
    for name, t in ours.items():
        if t is None or name == "w":
            continue
        assert (t.grad is None) == (ref[name].grad is None), name
        if t.grad is not None:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
            assert _err(t.grad, ref[name].grad) < tol, name


@pytest.mark.parametrize("node", [_fused, _unfused], ids=["lora_linear", "lora_add"])
@pytest.mark.parametrize("shared", [True, False], ids=["x_lora=x", "dropout"])
def test_second_derivatives_through_the_lora_nodes_are_the_plain_formula_s(node, shared):
    """The nodes saved x_lora @ A.T (and the fused one A and B cast) without a graph: differentiating their gradients
    again missed those terms, silently (d grad_A / dx came out 25% off the float64 formula's)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x, x_lora, a, b, bias = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                             for s in ((2, 3, K), (2, 3, K), (R, K), (N, R), (N,)))
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    x_lora = x if shared else x_lora

    def loss_grads(fn):
        y = fn(x, x_lora, w, bias, a, b, 0.7)
        return torch.autograd.grad(y.square().sum(), (x, x_lora, a, b), create_graph=True, allow_unused=True)

    probe = (torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g,
             dtype=torch.float64), torch.randn(R, K, generator=g, dtype=torch.float64),
             torch.randn(N, R, generator=g, dtype=torch.float64))
    for fn in (node, _plain):
        grads = loss_grads(fn)
        second = torch.autograd.grad(sum((gr * p).sum() for gr, p in zip(grads, probe) if gr is not None),
                                     (x, a, b, bias), allow_unused=True)
        if fn is node:
            ours = second
    for name, got, expected in zip(("x", "a", "b", "bias"), ours, second):
        assert (got is None) == (expected is None), name
        if got is not None:
            assert rel_err(got, expected) < 1e-10, name
    assert torch.autograd.gradgradcheck(lambda *t: node(*t[:2], w, *t[2:], 0.7), (x, x_lora, bias, a, b))


def _t(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    ("bad", "operands"),
    [
        ("bias", lambda x: (x, x, _t(N, K), _t(1), _t(R, K), _t(N, R))),
        ("bias", lambda x: (x, x, _t(N, K), _t(M, N), _t(R, K), _t(N, R))),
        ("x_lora", lambda x: (x.view(2, 2, K), _t(M, K), _t(N, K), None, _t(R, K), _t(N, R))),
        ("x_lora", lambda x: (x, _t(M, K + 2), _t(N, K), None, _t(R, K + 2), _t(N, R))),
        ("lora_a", lambda x: (x, x, _t(N, K), None, _t(R, K + 1), _t(N, R))),
        ("lora_b", lambda x: (x, x, _t(N, K), None, _t(R, K), _t(N + 1, R))),
        ("lora_b", lambda x: (x, x, _t(N, K), None, _t(R, K), _t(N, R + 1))),
        ("x", lambda x: (x, x, _t(N, K + 1), None, _t(R, K + 1), _t(N, R))),
        ("x", lambda x: (_t(()), _t(()), _t(N, K), None, _t(R, K), _t(N, R))),
        ("weight", lambda x: (x, x, _t(K), None, _t(R, K), _t(N, R))),
        ("lora_a", lambda x: (x, x, _t(N, K), None, _t(1, R, K), _t(N, R))),
    ],
)
def test_lora_linear_refuses_operands_whose_shapes_do_not_fit_in_one_line_naming_them(bad, operands):
    """These ran into torch's own errors naming none of the operands ("Bad in-place call: ... [4, 6] and [4, 5]"),
    or were accepted: a bias (1,) or (M, N) broadcast (the (M, N) one then failed in backward), an x_lora of other
    leading dims or even another K (with an A to match) paired its rows with x's."""
    x = _t(M, K).requires_grad_()
    with pytest.raises(ValueError, match=rf"^lora_linear got shapes \{{'{bad}': .*expected") as info:
        lora_linear(*operands(x), 1.0).sum().backward()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bias", [False, True])
def test_a_dense_base_weight_left_trainable_gets_peft_s_gradient_in_training(bias):
    """The fused node takes the base weight as frozen: a LoraLinear over an nn.Linear whose weight still requires
    grad (built directly, or unfrozen after injection) trained it in DoRA and in inference-time paths but silently
    gave it no gradient on the plain LoRA training path, where peft's lora.Linear gives the full one."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    base = nn.Linear(K, N, bias=bias)
    config = {"r": R, "lora_alpha": 3, "init_lora_weights": False, "lora_dropout": 0.0}
    ours = LoraLinear(copy.deepcopy(base), "default", LoraConfig(target_modules=["proj"], **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftLinear(copy.deepcopy(base), "default", config=PeftLoraConfig(**config), **config)
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(theirs.lora_B["default"].weight)
    assert ours.base_layer.weight.requires_grad and theirs.base_layer.weight.requires_grad
    x, grad_y = torch.randn(3, M, K), torch.randn(3, M, N)
    for layer in (ours, theirs):
        layer.train()
        layer(x).backward(grad_y)
    for name, p in theirs.named_parameters():
        ours_p = dict(ours.named_parameters())[name]
        assert ours_p.grad is not None, name
        assert rel_err(ours_p.grad, p.grad) < 1e-5, name
