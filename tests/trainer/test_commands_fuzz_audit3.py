"""Fuzz audit of merge, quantize and inspect against transformers, peft and bitsandbytes on random tiny Llamas and
random peft adapters: a merge reproduces the adapted model whatever the adapter targets, 4-bit checkpoints hold
bitsandbytes' own bytes, inspect counts bitsandbytes' bytes, and a write that fails leaves nothing behind."""

import errno
import json
import random

import pytest
import torch

from nf4lora.trainer.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown with a failure, to replay it
    return random.Random(seed)


def random_base(rng, out, **overrides):
    """A random tiny Llama written by transformers (safetensors): odd sizes, so rows are not whole blocks."""
    heads = rng.choice([1, 2, 4])
    config = dict(vocab_size=rng.randrange(40, 160), hidden_size=heads * rng.randrange(2, 12, 2),
                  intermediate_size=rng.randrange(5, 70), num_hidden_layers=rng.choice([1, 2]),
                  num_attention_heads=heads, num_key_value_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]),
                  head_dim=rng.choice([4, 8]), max_position_embeddings=32, tie_word_embeddings=rng.random() < 0.3,
                  attention_bias=rng.random() < 0.3, mlp_bias=rng.random() < 0.3)
    config.update(overrides)
    torch.manual_seed(rng.randrange(2**31))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, rng.choice([0.05, 0.5]))
    model.to(rng.choice([torch.float32, torch.bfloat16, torch.float16])).save_pretrained(out)
    return model.config


def random_adapter(rng, base, out, **config):
    """A peft adapter on ``base`` with random A, B (and DoRA magnitudes, trained biases) from a LoraConfig of random
    rank, alpha and options; ``config`` fixes some of them."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = dict(r=rng.choice([1, 2, 4]), lora_alpha=rng.choice([1, 4, 7.5]), use_rslora=rng.random() < 0.5,
                   use_dora=rng.random() < 0.3, init_lora_weights=False,
                   bias="lora_only" if model.config.mlp_bias and rng.random() < 0.5 else "none")
    options.update(config)
    adapted = peft.get_peft_model(model, peft.LoraConfig(**options))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    adapted.save_pretrained(out)


def bnb_dequantized(packed, state):
    """code[nibble] * absmax[block] of bitsandbytes' codes and absmax, by hand: its C++ CPU dequantizer mis-indexes
    absmax where a row is not a whole number of blocks (README)."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    nibbles = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()[:state.shape.numel()]
    blocks = torch.arange(state.shape.numel()) // state.blocksize
    return (state.code.float()[nibbles] * absmax.float()[blocks]).view(state.shape).to(state.dtype)


def peft_merge_on_the_dequantized_base(base, adapter):
    """peft's merge_and_unload on the transformers model whose decoder linears hold bitsandbytes' NF4 (blocksize 64,
    double quantization) round trip of their fp32 weights: what merge promises to equal."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, state = bnb_functional.quantize_4bit(module.weight, blocksize=64, compress_statistics=True,
                                                             quant_type="nf4")
                module.weight.copy_(bnb_dequantized(packed, state))
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def adapted_model(base, adapter):
    from nf4lora.lora import load_adapter
    from nf4lora.model import load_model

    return load_adapter(load_model(str(base), quantization="nf4", dtype=torch.float32), str(adapter)).eval()


def logits(model, ids):
    """(batch, seq, vocab) fp32 logits of a transformers model or ours (which returns the tensor itself)."""
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()


def merged_in_transformers(tmp_path, base, adapter, *flags):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32",
                 *flags]) == 0
    return transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), out


def test_a_dense_merge_of_an_adapter_on_some_layers_dequantizes_the_others(tmp_path, rng):
    """An adapter that left some linear layers alone (q_proj,v_proj, say) failed with "save_pretrained writes dense
    models; ... is 4-bit": the untargeted layers stayed NF4. They are the dequantized base too."""
    config = random_base(rng, tmp_path / "base")
    random_adapter(rng, tmp_path / "base", tmp_path / "adapter",
                   target_modules=rng.sample(LINEARS, rng.randrange(1, len(LINEARS))))
    merged, _ = merged_in_transformers(tmp_path, tmp_path / "base", tmp_path / "adapter")
    ids = torch.randint(0, config.vocab_size, (2, 7))
    expected = logits(peft_merge_on_the_dequantized_base(tmp_path / "base", tmp_path / "adapter"), ids)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merged, ids), logits(adapted_model(tmp_path / "base", tmp_path / "adapter"), ids),
                               rtol=1e-5, atol=1e-5)


HEAD_CHANGES = {
    "embedding saved": dict(modules_to_save=["embed_tokens"]),
    "head saved": dict(modules_to_save=["lm_head"]),
    "LoRA on the head": dict(target_modules=["q_proj", "lm_head"], use_dora=False),
}


@pytest.mark.parametrize("change", list(HEAD_CHANGES))
def test_a_merge_into_tied_embeddings_that_the_adapter_changes_reproduces_the_adapted_model(tmp_path, rng, change):
    """With tie_word_embeddings the adapted model runs the changed matrix on one side only (a modules_to_save copy;
    LoRA on lm_head), but the merged checkpoint said tied, so the head came back as the embedding (or merging LoRA
    into the shared matrix changed the embedding too): logits off by ~0.1-3."""
    config = random_base(rng, tmp_path / "base", tie_word_embeddings=True)
    random_adapter(rng, tmp_path / "base", tmp_path / "adapter", **{"target_modules": ["v_proj"], **HEAD_CHANGES[change]})
    merged, out = merged_in_transformers(tmp_path, tmp_path / "base", tmp_path / "adapter")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.randint(0, config.vocab_size, (2, 7))
    expected = logits(adapted_model(tmp_path / "base", tmp_path / "adapter"), ids)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_merge_into_tied_embeddings_that_the_adapter_leaves_alone_stays_tied(tmp_path, rng):
    from safetensors import safe_open

    random_base(rng, tmp_path / "base", tie_word_embeddings=True)
    random_adapter(rng, tmp_path / "base", tmp_path / "adapter", target_modules=list(LINEARS))
    _, out = merged_in_transformers(tmp_path, tmp_path / "base", tmp_path / "adapter")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize("command", ["quantize", "merge"])
def test_a_write_interrupted_below_new_directories_removes_them(monkeypatch, tmp_path, rng, command):
    """--out a/b/q: an interrupted (or failed) write removed its temp directory but left a/b behind."""
    random_base(rng, tmp_path / "base")
    random_adapter(rng, tmp_path / "base", tmp_path / "adapter", target_modules=list(LINEARS))

    def interrupt(model, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"nf4lora.model.{'save_quantized' if command == 'quantize' else 'save_pretrained'}",
                        interrupt)
    flags = ["--adapter", str(tmp_path / "adapter")] if command == "merge" else []
    assert main([command, "--model", str(tmp_path / "base"), *flags, "--out", str(tmp_path / "a" / "b" / "q")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_a_full_disk_is_one_line_and_leaves_nothing(monkeypatch, capsys, tmp_path, rng):
    """A full disk while writing was a traceback."""
    random_base(rng, tmp_path / "base")

    def disk_full(model, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nf4lora.model.save_quantized", disk_full)
    capsys.readouterr()
    assert main(["quantize", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "new" / "q")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nf4lora quantize: error: could not write the checkpoint"), err
    assert "No space left on device" in err and "free space and run again" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def transformers_4bit_weights(path):
    """{linear name: (packed codes, dequantized weight)} of a 4-bit checkpoint as transformers + bitsandbytes load it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    return {name: (m.weight.data.flatten(), bnb_dequantized(m.weight.data, m.weight.quant_state))
            for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def assert_ours_equal_theirs(path, theirs):
    from nf4lora.model import load_model

    ours = load_model(str(path), dtype=torch.float32)
    assert theirs and {n for n, m in ours.named_modules() if type(m).__name__ == "NF4Linear"} == set(theirs)
    for name, (packed, weight) in theirs.items():
        mine = ours.get_submodule(name).weight
        assert torch.equal(mine.packed.flatten(), packed), name
        assert torch.equal(mine.dequantize(weight.dtype), weight), name


@pytest.mark.filterwarnings("ignore:merge_and_unload\\(requantize=True\\)")
def test_4bit_checkpoints_hold_what_transformers_and_bitsandbytes_would_quantize(tmp_path, rng):
    """quantize writes the codes transformers + bitsandbytes quantize themselves; both readers dequantize it, and a
    merge --quantize nf4, to the same bits."""
    random_base(rng, tmp_path / "base")
    dtype, double_quant = rng.choice(["fp32", "bf16", "fp16"]), rng.random() < 0.5
    flags = ["--dtype", dtype, "--double-quant" if double_quant else "--no-double-quant"]
    assert main(["quantize", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "q"), *flags]) == 0
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    own = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), dtype=torch_dtype, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch_dtype))
    theirs = transformers_4bit_weights(tmp_path / "q")
    for name, m in own.named_modules():
        if name in theirs:
            assert torch.equal(m.weight.data.flatten(), theirs[name][0]), name
    assert_ours_equal_theirs(tmp_path / "q", theirs)
    random_adapter(rng, tmp_path / "base", tmp_path / "adapter", target_modules=rng.sample(LINEARS, 3))
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "m"), "--quantize", "nf4", *flags]) == 0
    assert_ours_equal_theirs(tmp_path / "m", transformers_4bit_weights(tmp_path / "m"))


def bnb_bytes(shape, blocksize, double_quant):
    """Bytes of one weight as bitsandbytes stores it: packed codes, absmax and, double-quantized, the nested absmax
    and the fp32 offset."""
    packed, state = bnb_functional.quantize_4bit(torch.randn(shape), blocksize=blocksize,
                                                 compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax] + ([state.state2.absmax, torch.zeros(1)] if double_quant else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def test_inspect_counts_the_bytes_bitsandbytes_stores(capsys, tmp_path, rng):
    random_base(rng, tmp_path / "base")
    capsys.readouterr()  # drop what saving the base printed
    blocksize = rng.choice([64, 128, 256])
    assert main(["inspect", "--model", str(tmp_path / "base"), "--blocksize", str(blocksize), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    shapes = [m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    dense = model.num_parameters() - sum(s.numel() for s in shapes)
    assert report["parameters"] == model.num_parameters()
    assert report["bytes"] == {"bf16": 2 * model.num_parameters(),
                               "nf4": 2 * dense + sum(bnb_bytes(s, blocksize, False) for s in shapes),
                               "nf4_double_quant": 2 * dense + sum(bnb_bytes(s, blocksize, True) for s in shapes)}
