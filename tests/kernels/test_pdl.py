import pytest
import torch

from nf4lora.kernels import pdl


def test_off_without_a_hopper_gpu_or_under_the_interpreter():
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_meta(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}


@pytest.mark.gpu
def test_decode_with_dependent_launches_equals_decode_without(monkeypatch):
    from nf4lora.kernels import gemv_nf4
    from nf4lora.model import Llama, LlamaConfig, generate
    from nf4lora.nf4.linear import quantize_linears

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("cuda"):
        model = quantize_linears(Llama(config).to(torch.bfloat16).eval())
    prompt = torch.randint(0, 256, (2, 7), device="cuda")

    def run():
        with torch.no_grad():
            cache = model.new_cache(2, 32)
            logits = torch.cat([model(prompt, cache=cache)] + [model(prompt[:, :1], cache=cache) for _ in range(3)], 1)
        return logits, generate(model, prompt, max_new_tokens=12, eos_ids=(), cuda_graph=True)

    with_pdl = run()
    # the fused kernels really were launched as dependents
    assert any(relaunch.compiled.metadata.launch_pdl for relaunch in gemv_nf4._launch_gemv_parts.compiled.values())
    monkeypatch.setattr(pdl, "enabled", lambda device: False)
    without = run()
    assert torch.equal(with_pdl[0], without[0]) and torch.equal(with_pdl[1], without[1])
