"""Decoding a model split over GPUs from one CUDA graph per GPU's run of stages (`_GraphedDecodeStep`): the
stage methods compose to `Llama.forward`, the runs follow the devices, and on two GPUs the graphed tokens equal the
eager fixed-shape step's."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from nf4lora.model import Llama, LlamaConfig, generate, load_model

generate_module = importlib.import_module("nf4lora.model.generate")  # the package exports the function

from .test_generate import _left_padded  # noqa: E402


def _model(layers=4, seed=0):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return Llama(config).eval()


def test_device_runs_follow_the_layers_devices():
    model = _model(layers=5)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    for i in (1, 2, 4):
        model.model.layers[i].to(meta)
    runs = generate_module._device_runs(model)
    assert runs == [
        (cpu, [("embed",), ("layers", range(0, 1))]),
        (meta, [("layers", range(1, 3))]),
        (cpu, [("layers", range(3, 4))]),
        (meta, [("layers", range(4, 5))]),
        (cpu, [("output",)]),
    ]
    assert generate_module._device_runs(_model(layers=3)) == [
        (cpu, [("embed",), ("layers", range(0, 3)), ("output",)])]


@pytest.mark.parametrize("cuts", [(), (1,), (1, 3), (0, 2, 4)])
def test_runs_with_their_copies_compose_to_the_fixed_shape_forward(cuts):
    """The segmented step's stages and state copies, without graphs: equal to one forward, bit for bit."""
    model = _model()
    ids, mask = _left_padded()
    batch = ids.shape[0]
    cache = model.new_cache(batch, 16)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, cache=cache)
        step = SimpleNamespace(ids=torch.randint(3, 96, (batch, 1)), pos=positions[:, -1:] + 1,
                               slot=torch.tensor([ids.shape[1]]))
        expected = model(step.ids, position_ids=step.pos, cache=cache, cache_position=step.slot)
        bounds = [0, *cuts, len(model.model.layers)]
        stages = [("embed",)] + [("layers", range(a, b)) for a, b in zip(bounds, bounds[1:]) if a < b]
        state = None
        for stage in [*stages, ("output",)]:
            if state is not None and stage[0] != "output":
                state, copies = generate_module._moved_state(state, torch.device("cpu"))
                assert all(static is not produced for static, produced in copies)
                for static, produced in copies:
                    static.copy_(produced)
            state = generate_module._GraphedDecodeStep._run(step, model, cache, [stage], state)
    assert torch.equal(state, expected)


def test_inv_freq_is_copied_to_another_device_once_per_buffer():
    model = _model()
    meta = torch.device("meta")
    assert model._inv_freq_on(torch.device("cpu")) is model.inv_freq
    copy = model._inv_freq_on(meta)
    assert copy.device == meta and model._inv_freq_on(meta) is copy
    model.inv_freq = model.inv_freq.clone()  # as model.to() or the loader replace the buffer
    assert model._inv_freq_on(meta) is not copy


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("quantization, dtype", [(None, torch.float32), ("nf4", torch.bfloat16)])
def test_split_model_decodes_from_a_graph_per_gpu_like_its_eager_step(checkpoints, monkeypatch, quantization, dtype):
    model = load_model(checkpoints("sharded"), quantization=quantization, dtype=dtype, device="auto")
    runs = generate_module._device_runs(model)
    assert len({device for device, _ in runs}) == 2  # a graph per GPU, with the state copied between them
    built = []
    real_step = generate_module._GraphedDecodeStep
    monkeypatch.setattr(generate_module, "_GraphedDecodeStep", lambda *a: built.append(real_step(*a)) or built[-1])
    ids, mask = _left_padded()
    ids, mask = ids.cuda(), mask.cuda()
    default = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_ids=())
    assert len(built) == 1 and len(built[0].segments) == len(runs)
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_ids=(), static_cache=True,
                     cuda_graph=False)
    assert torch.equal(default, eager)
    sampled = [generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_ids=(), temperature=0.9, seed=7,
                        static_cache=True, cuda_graph=graph) for graph in (True, False)]
    assert len(built) == 2
    assert torch.equal(*sampled)


@pytest.mark.gpu
@two_gpus
def test_split_model_whose_head_is_apart_from_its_norm_is_refused_a_graph(checkpoints):
    model = load_model(checkpoints("sharded"), dtype=torch.float32, device="auto")
    model.model.norm.to("cuda:1")
    model.lm_head.to("cuda:0")
    ids = torch.randint(3, 96, (1, 5), device="cuda:0")
    with pytest.raises(ValueError, match="the final norm and lm_head on one"):
        generate(model, ids, max_new_tokens=10, cuda_graph=True)
    # the automatic choice falls back to eager steps
    assert generate(model, ids, max_new_tokens=10, eos_ids=()).shape == (1, 15)
