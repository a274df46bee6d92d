"""Parity 6, each against transformers + bitsandbytes 0.50 (and peft) on the CPU: the dtype a 4-bit linear holds its
bias in (the model's, cast to compute_dtype per forward, as Linear4bit) through loading, save_quantized and the
re-quantizing merge; the valid names load_model's unknown-option error lists; and added tokens' single_word and
normalized flags next to a tokenizer.model."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from nf4lora.lora import LoraConfig, inject_lora, merge_and_unload
from nf4lora.model import load_model, load_tokenizer
from nf4lora.model.loading import save_quantized
from nf4lora.nf4 import dequantize
from nf4lora.nf4.linear import NF4Linear

from lora_helpers import OneLayer, copy_lora_weights

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K, N = 128, 48  # K a whole number of 64-blocks: bitsandbytes' CPU dequantize is wrong for ragged rows




def _dtype_pair(rng) -> tuple[torch.dtype, torch.dtype]:
    """A (model dtype, compute dtype) pair that differ."""
    model_dtype = rng.choice(DTYPES)
    return model_dtype, rng.choice([d for d in DTYPES if d != model_dtype])


def _dense(model_dtype: torch.dtype) -> nn.Linear:
    """A random (N, K) linear in `model_dtype` whose bias has values that no narrower dtype holds."""
    dense = nn.Linear(K, N, dtype=model_dtype)
    with torch.no_grad():
        dense.weight.normal_(std=K**-0.5)
        dense.bias.normal_()
    return dense


def _linear4bit(bnb, dense: nn.Linear, compute_dtype: torch.dtype):
    """bitsandbytes' Linear4bit (NF4, double quant) of `dense`, its bias in dense's dtype as transformers loads it."""
    layer = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=True)
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # its packed eval path computes otherwise than the plain one
    return layer


# 1. the bias dtype

def test_nf4linear_holds_its_bias_in_the_given_dtype_and_adds_it_as_linear4bit_does(bnb, rng):
    for _ in range(12):
        model_dtype, compute = _dtype_pair(rng)
        dense = _dense(model_dtype)
        ours, theirs = NF4Linear.from_linear(dense, compute_dtype=compute), _linear4bit(bnb, dense, compute)
        # was held in compute_dtype: an fp32 or fp16 bias lost its low bits to a bf16 compute dtype for good
        assert ours.bias.dtype == model_dtype and torch.equal(ours.bias, dense.bias), (model_dtype, compute)
        x_dtype = rng.choice(DTYPES)
        zeros = torch.zeros(rng.randint(1, 3), K, dtype=x_dtype)
        with torch.no_grad():
            # x = 0 leaves the bias alone in the output, so both layers' bias arithmetic compares bit for bit
            assert torch.equal(ours(zeros), theirs(zeros)), (model_dtype, compute, x_dtype)
            x = torch.randn(3, K).to(x_dtype)
            expected = nn.functional.linear(x.to(compute), dequantize(ours.weight, compute), dense.bias.to(compute))
            assert torch.equal(ours(x), expected.to(x_dtype)), (model_dtype, compute, x_dtype)
        ours.bias.requires_grad_(True)
        ours(x).float().sum().backward()
        assert ours.bias.grad.dtype == model_dtype and ours.bias.dtype == model_dtype


def _tiny_llama_with_biases(path) -> str:
    """A transformers-saved fp32 Llama whose attention and MLP linears have random biases."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    model.save_pretrained(path)
    return str(path)


def _file_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
def test_save_quantized_writes_the_biases_transformers_writes(bnb, tmp_path, model_dtype):
    transformers = pytest.importorskip("transformers")
    source = _tiny_llama_with_biases(tmp_path / "source")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=model_dtype)
    hf.save_pretrained(tmp_path / "hf")  # before any forward: Linear4bit's first forward recasts its bias in place
    ours = load_model(source, quantization="nf4", dtype=model_dtype, compute_dtype="bfloat16")
    save_quantized(ours, tmp_path / "ours")
    theirs, written = _file_tensors(tmp_path / "hf"), _file_tensors(tmp_path / "ours")
    biases = [key for key in theirs if key.endswith(".bias")]
    assert len(biases) == 7
    for key in biases:
        # were rounded to bf16 on the way (an fp32 -> bf16 -> fp32 round trip)
        assert written[key].dtype == theirs[key].dtype == model_dtype and torch.equal(written[key], theirs[key]), key
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        logits, their_logits = ours(ids).double(), hf(ids).logits.double()
    # the same 4-bit weights and bias through another CPU matmul (bitsandbytes dequantizes otherwise)
    assert ((logits - their_logits).norm() / their_logits.norm()).item() < 2e-2
    back = load_model(tmp_path / "ours", dtype="auto")
    save_quantized(back, tmp_path / "again")
    again = _file_tensors(tmp_path / "again")
    assert written.keys() == again.keys()
    assert all(again[key].dtype == t.dtype and torch.equal(again[key], t) for key, t in written.items())


def _peft_and_ours(dense: nn.Linear, theirs_base, compute: torch.dtype, spec: dict):
    """peft's LoRA on bitsandbytes' base and ours on NF4Linear of the same dense layer, with peft's adapter values."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(OneLayer(theirs_base, loaded_in_4bit=True), PeftLoraConfig(**spec))
    ours = inject_lora(OneLayer(NF4Linear.from_linear(dense, compute_dtype=compute)), LoraConfig(**spec))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def test_requantizing_merge_gives_peft_s_weight_and_bias_on_linear4bit(bnb, rng):
    for _ in range(6):
        model_dtype, compute = _dtype_pair(rng)
        lora_bias = rng.random() < 0.5
        dense = _dense(model_dtype)
        # peft's 4-bit merge adds lora_B's bias unscaled (its dense merge scales it): lora_alpha = r keeps scaling 1
        spec = dict(r=4, lora_alpha=4, target_modules=["proj"], init_lora_weights=False, lora_bias=lora_bias)
        theirs, ours = _peft_and_ours(dense, _linear4bit(bnb, dense, compute), compute, spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            their_merge = theirs.merge_and_unload().proj
            our_merge = merge_and_unload(ours, requantize=True).proj
        case = (model_dtype, compute, lora_bias)
        # the bias was rounded to compute_dtype; peft leaves it as held, or sums it with an fp32 LoRA bias in fp32
        assert our_merge.bias.dtype == their_merge.bias.dtype and torch.equal(our_merge.bias, their_merge.bias), case
        # an fp16/bf16 base's merge was rounded to its dtype before re-quantizing; peft quantizes the fp32 sum
        state = their_merge.weight.quant_state
        assert our_merge.weight.dtype == state.dtype, case
        expected = bnb.functional.dequantize_4bit(their_merge.weight.data, state).float()
        assert torch.equal(our_merge.dequantized_weight(torch.float32), expected), case


def test_lora_on_an_nf4_base_adds_the_bias_in_compute_dtype_and_trains_it_in_the_model_s(bnb, rng):
    model_dtype, compute = torch.float32, torch.bfloat16
    dense = _dense(model_dtype)
    spec = dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, bias="lora_only")
    theirs, ours = _peft_and_ours(dense, _linear4bit(bnb, dense, compute), compute, spec)
    x = torch.randn(2, 5, K)
    y = ours(x)  # the fused training node: it refused an fp32 bias beside bf16 operands
    with torch.no_grad():
        y_theirs = theirs(x)
    assert y.dtype == y_theirs.dtype == torch.float32
    assert ((y - y_theirs).norm() / y_theirs.norm()).item() < 2e-2  # bf16 compute, two CPU matmul paths
    y.sum().backward()
    bias = ours.proj.base_layer.bias
    assert bias.dtype == bias.grad.dtype == model_dtype


# 2. load_model's unknown options

def test_an_unknown_load_model_option_lists_every_accepted_keyword(tmp_path):
    with pytest.raises(TypeError) as raised:
        load_model(str(tmp_path), revisoin="main")  # was: valid: the LoadOptions fields only, not revision
    message = str(raised.value)
    assert "\n" not in message and "unknown option(s) ['revisoin']" in message
    valid = message.split("; valid: ")[1]
    for keyword in ("quantization", "dtype", "device", "revision", "blocksize", "double_quant", "compute_dtype",
                    "skip_modules", "gradient_checkpointing", "device_map"):
        assert f"'{keyword}'" in valid, keyword


# 3. single_word / normalized added tokens next to a tokenizer.model

CORPUS = ["The quick brown fox jumps over the lazy dog; it is singing and ringing. x>the ab_b 12 naïve 東京"] * 40
CANDIDATES = ["<sw>", "ing", "fox", "<n>", "ox", "the q", "x>", "ab", "b", "_x", "é", " the", "e\u0301", "<|a|>", "a"]
PIECES = ["the", " ", "ing", "fox", "ox", "x", ">", "q", "_", "1", "²", "é", "e\u0301", "東", "  ", "\n", "quick", "a",
          "b", "\u3000", "<"]


def _llama_reference(out, legacy: bool = False):
    """transformers' LlamaTokenizer over the pieces of a Llama-style tokenizer.model trained into `out`."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    out.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(out / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, normalization_rule_name="identity", character_coverage=1.0,
                                   remove_extra_whitespaces=False, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=legacy, add_bos_token=True)


def _saved_with(reference, out, tokens) -> None:
    """`tokens` (AddedToken) added to `reference` (special ones as special tokens), all saved into `out`."""
    for token in tokens:
        reference.add_tokens([token], special_tokens=token.special)
    reference.save_pretrained(str(out))


def test_added_tokens_single_word_and_normalized_split_like_transformers(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    for k in range(4):
        out = tmp_path / str(k)
        texts = rng.sample(CANDIDATES, rng.randint(2, 7))
        flags = ("special", "single_word", "normalized", "lstrip", "rstrip")
        _saved_with(_llama_reference(out, legacy=rng.random() < 0.3), out,
                    [AddedToken(text, **{flag: rng.random() < 0.5 for flag in flags}) for text in texts])
        hf, tok = transformers.AutoTokenizer.from_pretrained(str(out)), load_tokenizer(out)
        for _ in range(150):
            text = "x" + "".join(rng.choice(PIECES + texts) for _ in range(rng.randint(1, 10)))
            # 948 of 2,000 such texts differed: both flags were ignored, and an added token the .model has too
            # ("fox") was not split out
            assert tok.encode(text) == hf.encode(text), (text, hf.added_tokens_decoder)


def test_single_word_and_normalized_pinned(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    out = tmp_path / "t"
    _saved_with(_llama_reference(out), out, [
        AddedToken("ing", single_word=True, normalized=False), AddedToken("ab", normalized=True),
        AddedToken("b", normalized=False), AddedToken("<sw>", single_word=True, special=True)])
    hf, tok = transformers.AutoTokenizer.from_pretrained(str(out)), load_tokenizer(out)
    ids = {text: hf.convert_tokens_to_ids(text) for text in ("ing", "ab", "b", "<sw>")}
    for text in ("xsinging", "x é<sw>", "x sing ing", "x ab"):
        assert tok.encode(text) == hf.encode(text), text
    # "ing" inside a word and "<sw>" after "é" (a word character) are no tokens; "ing" between spaces is one
    assert ids["ing"] not in tok.encode("xsinging") and ids["<sw>"] not in tok.encode("x é<sw>")
    assert ids["ing"] in tok.encode("x sing ing")
    # "b", not normalized, is split out before the normalized "ab" is looked for: "ab" never matches
    assert ids["ab"] not in tok.encode("x ab") and ids["b"] in tok.encode("x ab")
