import json

import pytest
import torch

from nf4lora.trainer.cli import main
from nf4lora.trainer.config import DEFAULT_TEMPLATE, TrainConfig
from nf4lora.trainer.job import run_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data_file):
    """A run on the tiny NF4 model: its directory holds the adapter that the commands below use."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(run), max_steps=3,
                         micro_batch=2, lr=1e-2, max_len=192, progress=False, max_new_tokens=0, dtype="fp32")
    run_train(config, log=lambda _: None)
    return run


def adapted_logits(model_dir, adapter, ids, quantization="nf4"):
    from nf4lora.lora import load_adapter
    from nf4lora.model import load_model

    model = load_model(str(model_dir), quantization=quantization, dtype=torch.float32)
    load_adapter(model, str(adapter))
    with torch.no_grad():
        return model.eval()(ids)


IDS = torch.randint(3, 300, (2, 19), generator=torch.Generator().manual_seed(1))


def test_merge_output_loads_in_transformers_and_matches_the_adapter_model(tmp_path, tiny_model_dir, trained):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(trained), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()
    merged = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        actual = merged(input_ids=IDS).logits
    expected = adapted_logits(tiny_model_dir, trained, IDS)
    # --dtype fp32 stores the merged weights in fp32; even bf16 storage (auto: relative rounding <= 2**-9 per
    # weight) would move logits of magnitude ~1 through two layers of this tiny model by well under 1e-2.
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


def test_merge_with_nf4_requantizes_the_merged_weights(tmp_path, tiny_model_dir, trained):
    from safetensors.torch import load_file

    from nf4lora.model import load_model

    dense, four_bit = tmp_path / "dense", tmp_path / "merged4"
    common = ["--model", str(tiny_model_dir), "--adapter", str(trained), "--dtype", "fp32"]
    assert main(["merge", *common, "--out", str(dense)]) == 0
    with pytest.warns(UserWarning):
        assert main(["merge", *common, "--out", str(four_bit), "--quantize", "nf4"]) == 0
    model = load_model(str(four_bit), dtype=torch.float32)
    assert sum(1 for m in model.modules() if type(m).__name__ == "NF4Linear") == 14
    merged = load_file(str(dense / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].float()
    stored = model.model.layers[0].self_attn.q_proj.weight.dequantize(torch.float32)
    # Every weight lands on one of NF4's 16 levels: the widest gap between levels is 0.304 of the block absmax,
    # so rounding moves a weight by at most 0.152 * absmax; bf16 storage of the dense copy adds < 0.4%.
    blocks = merged.flatten().view(-1, 64)
    bound = 0.16 * blocks.abs().amax(dim=1, keepdim=True)
    assert ((stored.flatten().view(-1, 64) - blocks).abs() <= bound).all()
    assert not torch.equal(stored, merged)


def test_quantize_writes_bitsandbytes_format_that_reloads_bit_exactly(tmp_path, tiny_model_dir):
    from nf4lora.model import load_model

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    stored = load_model(str(out))
    direct = load_model(str(tiny_model_dir), quantization="nf4", dtype=torch.bfloat16)
    a = stored.model.layers[1].mlp.down_proj.weight
    b = direct.model.layers[1].mlp.down_proj.weight
    assert torch.equal(a.packed, b.packed) and torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))
    code = main(["quantize", "--model", str(tiny_model_dir), "--out", str(out)])
    assert code == 2


def _generated_text(model_dir, adapter, prompt_text, max_new_tokens=12):
    """What greedy generation from ``prompt_text`` (BOS added) prints with the adapter on the NF4 base."""
    from nf4lora.lora import load_adapter
    from nf4lora.model import generate, load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_adapter(load_model(str(model_dir), quantization="nf4", dtype=torch.float32), str(adapter))
    ids = tokenizer.encode(prompt_text)
    expected = generate(model.eval(), [ids], max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
    return tokenizer.decode([t for t in expected if t not in tokenizer.eos_ids][:max_new_tokens])


def test_generate_streams_the_same_tokens_as_model_generate(capsys, tmp_path, tiny_model_dir, trained):
    prompt = "Either party may terminate this Agreement"
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(trained), "--prompt", prompt,
                 "--max-new-tokens", "12", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f">>> {prompt}"
    # the training run's template by default
    assert "\n".join(out[1:]) == _generated_text(tiny_model_dir, trained, DEFAULT_TEMPLATE.format(prompt=prompt))


def test_a_run_on_plain_text_records_generates_from_the_bare_prompt(capsys, tmp_path, tiny_model_dir):
    """Plain-text records are trained on as they are, so neither the run's closing sample nor generate wraps the
    prompt in the (unused) template; the run records the format it detected."""
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"Note {i}: the lessee pays rent monthly."}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    summary = run_train(TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(run), max_steps=2,
                                    micro_batch=2, max_len=64, progress=False, max_new_tokens=5, dtype="fp32",
                                    sample_prompt="Note 3:"), log=lambda _: None)
    assert json.loads((run / "run_config.json").read_text())["record_format"] == "text"
    assert summary["sample"]["completion"] == _generated_text(tiny_model_dir, run, "Note 3:", 5)
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(run), "--prompt", "Note 3:",
                 "--max-new-tokens", "5", "--dtype", "fp32"]) == 0
    assert "\n".join(capsys.readouterr().out.splitlines()[1:]) == _generated_text(tiny_model_dir, run, "Note 3:", 5)


def test_a_run_records_the_record_format_it_detected(trained):
    assert json.loads((trained / "run_config.json").read_text())["record_format"] == "prompt-completion"


def test_generate_reads_a_prompts_file_and_rejects_a_missing_adapter(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(prompts),
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert ">>> first prompt" in out and ">>> second prompt" in out
    code = main(["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "--prompt", "x"])
    assert code == 2 and "no adapter_config.json there" in capsys.readouterr().err


def test_merge_and_generate_quantize_the_base_from_the_dtype_the_run_trained_in(tmp_path, tiny_model_dir, data_file):
    """A run that trained in bf16 on an fp32 checkpoint quantized the base from bf16-rounded weights; merge and
    generate on a CPU (fp32) must quantize the same values, or their base is not the one the adapter learned on."""
    import argparse

    from nf4lora.trainer import commands
    from nf4lora.trainer.job import load_base

    run = tmp_path / "run"
    run_train(TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(run), max_steps=1,
                          micro_batch=2, max_len=192, progress=False, max_new_tokens=0, dtype="bf16"),
              log=lambda _: None)
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["resolved_dtype"] == "bf16"
    args = argparse.Namespace(model=str(tiny_model_dir), device="cpu", dtype="fp32", quantization="nf4", blocksize=64,
                              double_quant=True)
    trained = load_base(str(tiny_model_dir), TrainConfig(dtype="bf16"), torch.device("cpu"), torch.bfloat16)
    for run_config, same in ((recorded, True), ({}, False)):  # without the record the fp32 weights are quantized
        model, _ = commands._load(args, run=run_config)
        layer = model.model.layers[0].mlp.down_proj
        assert torch.equal(layer.weight.packed, trained.model.layers[0].mlp.down_proj.weight.packed) == same
        assert layer.compute_dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(run), "--out", str(merged),
                 "--dtype", "fp32", "--device", "cpu"]) == 0


def test_streamed_text_waits_for_the_last_byte_of_a_character_split_over_tokens(monkeypatch):
    # byte tokens of UTF-8 text, decoded as byte-fallback tokenizers do: U+FFFD until a character is whole
    import nf4lora.model as model_api
    from nf4lora.trainer.commands import stream_generate

    text = "héllo 😀 wörld 中文" + "😀"[:1]
    tokens = list(text.encode("utf-8"))[:-2]  # generation stops inside the last emoji: its marks are the end

    class ByteTokenizer:
        eos_ids = (1000,)

        def encode(self, text, bos=True, eos=False):
            return [7]

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    def fake_stream(model, prompts, max_new_tokens, *args, **kwargs):
        for token in tokens:
            yield torch.tensor([token])

    monkeypatch.setattr(model_api, "generate_stream", fake_stream)
    pieces = []
    new = stream_generate(None, ByteTokenizer(), "prompt", len(tokens), 0.0, None, None, 0, pieces.append)
    assert new == tokens
    assert "".join(pieces) == bytes(tokens).decode("utf-8", errors="replace")
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])
