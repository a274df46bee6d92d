"""Leftovers 5 of the model package, each checked against transformers (+ bitsandbytes 4-bit on the CPU): Qwen's
`"bos_token": null`, added tokens marked lstrip/rstrip next to a tokenizer.model, the dtype save_quantized writes a
4-bit linear's bias in, the hub `revision` of load_model / load_tokenizer, and generate past
max_position_embeddings."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from nf4lora.model import generate, load_model, load_tokenizer
from nf4lora.model.loading import save_quantized

from .conftest import hf_model
from .test_loading_options_fuzz_audit4 import _add_snapshot, _hub_cache, _revision
from .test_model_audit import _assert_one_line
from .test_tokenizer_fuzz_audit4 import GLUED, WORDS, _llama_sp, _reference

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the Unicode White_Space the tokenizers library strips next to an lstrip/rstrip token, and "\x1c", which
# str.isspace() counts but tokenizers keeps
SPACES = [" ", "  ", "\t", "\n", " \n ", "\u3000", "\xa0", "\u2009", "\x85", "\x1c"]
STRIPPING = {"<|l|>": (True, False), "<|r|>": (False, True), "<|lr|>": (True, True), "<|n|>": (False, False)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _qwen_tokenizer(out, tokenizer_config: dict, bos_post_processor: bool = False):
    """A Qwen-style byte-level BPE tokenizer.json in `out` (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2), with a
    post-processor that adds <|endoftext|> if asked, tokenizer_config.json's `added_tokens_decoder` plus
    `tokenizer_config`, and a generation_config.json that names <|endoftext|> as its BOS (as Qwen's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(GLUED, trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIALS))
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(i): {"content": s, "special": True} for i, s in enumerate(QWEN_SPECIALS)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": decoder, **tokenizer_config}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 0]}))
    return out


def _texts(rng, words, inserts, n):
    """`n` texts of `words` with `inserts` put in; none starts with whitespace (see tokenizer.py's docstring)."""
    for _ in range(n):
        parts = [rng.choice(["x", *inserts])] + rng.choices([*words, *inserts], k=rng.randint(0, 8))
        yield "".join(parts)


# 1. "bos_token": null

@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_a_null_bos_token_in_tokenizer_json_models_is_no_bos_like_transformers(tmp_path, bos_post_processor):
    path = _qwen_tokenizer(tmp_path, {"bos_token": None}, bos_post_processor)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    tok = load_tokenizer(path)
    # was generation_config.json's <|endoftext|>, which encode(bos=True) then put in front
    assert tok.bos_id is hf.bos_token_id is None
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (2, 0)
    seed = random.randrange(2**32)
    for text in _texts(random.Random(seed), ["hello", " world", " the", "fox", "\n"], QWEN_SPECIALS, 40):
        ids = tok.encode(text)
        assert ids == hf.encode(text) == tok.encode(text, bos=True), (seed, text)


@pytest.mark.parametrize("generation_bos", [None, 5])
def test_a_null_bos_token_next_to_a_tokenizer_model_is_no_bos_like_transformers(tmp_path, generation_bos):
    _llama_sp(tmp_path, GLUED)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "legacy": False}))
    if generation_bos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": generation_bos}))
    tok = load_tokenizer(tmp_path)
    hf = _reference(tok, bos_token=None, legacy=False)  # transformers' LlamaTokenizer of that tokenizer_config
    assert tok.bos_id is hf.bos_token_id is None  # was the .model's <s> (or generation_config.json's 5)
    assert (tok.eos_id, tok.pad_id) == (2, 2)  # a null BOS leaves EOS and the pad fallback as they were
    seed = random.randrange(2**32)
    for text in _texts(random.Random(seed), WORDS, ["</s>", "<unk>"], 40):
        assert tok.encode(text) == hf.encode(text) == tok.encode(text, bos=True), (seed, text)


# 2. lstrip / rstrip of added tokens next to a tokenizer.model

@pytest.fixture(scope="module", params=[False, True], ids=["added", "special"])
def stripping_dirs(request, tmp_path_factory):
    """One fine-tune's tokenizer.model plus the STRIPPING tokens (special or not), as transformers 5 saves it
    (tokenizer.json lists them), and a copy that lists them only in tokenizer_config.json's added_tokens_decoder
    (transformers 4's save); with transformers' tokenizer of the first."""
    from tokenizers import AddedToken

    saved = _llama_sp(tmp_path_factory.mktemp("strip_json"), GLUED)
    hf = _reference(load_tokenizer(saved))
    hf.add_tokens([AddedToken(text, lstrip=left, rstrip=right, special=request.param, normalized=False)
                   for text, (left, right) in STRIPPING.items()], special_tokens=request.param)
    hf.save_pretrained(str(saved))
    decoder_only = tmp_path_factory.mktemp("strip_decoder")
    (decoder_only / "tokenizer.model").write_bytes((saved / "tokenizer.model").read_bytes())
    added = json.loads((saved / "tokenizer.json").read_text())["added_tokens"]
    (decoder_only / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "added_tokens_decoder": {
        str(t["id"]): {key: t[key] for key in ("content", "special", "lstrip", "rstrip")} for t in added}}))
    return saved, decoder_only, transformers.AutoTokenizer.from_pretrained(str(saved))


@pytest.mark.parametrize("listed_in", ["tokenizer.json", "added_tokens_decoder"])
def test_added_tokens_take_the_whitespace_they_strip_like_transformers(stripping_dirs, listed_in):
    saved, decoder_only, hf = stripping_dirs
    tok = load_tokenizer(saved if listed_in == "tokenizer.json" else decoder_only)
    seed = random.randrange(2**32)
    for text in _texts(random.Random(seed), [*WORDS, *SPACES, *SPACES], list(STRIPPING), 150):
        # "x \n<|l|>" kept the " \n" before the token, "<|r|>\u3000the" the space after it
        assert tok.encode(text) == hf.encode(text), (seed, text)


# 3. save_quantized's bias dtype

@pytest.fixture(scope="module")
def bias_checkpoint(tmp_path_factory):
    """A transformers-saved float32 checkpoint whose attention and MLP linears have random biases."""
    model = hf_model(num_hidden_layers=1, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(generator=torch.Generator().manual_seed(random.randrange(2**32)))
    path = tmp_path_factory.mktemp("bias") / "m"
    model.save_pretrained(path)
    return str(path)


def _file_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_save_quantized_writes_a_4bit_linears_bias_in_the_model_dtype_like_transformers(bias_checkpoint, tmp_path,
                                                                                       dtype):
    pytest.importorskip("bitsandbytes")
    compute = random.choice([name for name in DTYPES if name != dtype])
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=DTYPES[compute])
    hf = transformers.AutoModelForCausalLM.from_pretrained(bias_checkpoint, quantization_config=config,
                                                           dtype=DTYPES[dtype])
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(bias_checkpoint, quantization="nf4", dtype=dtype, compute_dtype=compute)
    save_quantized(ours, tmp_path / "ours")
    theirs, written = _file_tensors(tmp_path / "hf"), _file_tensors(tmp_path / "ours")
    biases = [key for key in theirs if key.endswith(".bias")]
    assert len(biases) == 7
    for key in biases:
        name = key.removesuffix(".bias")
        module, their_bias = ours.get_submodule(name), hf.get_submodule(name).bias
        # the bias bitsandbytes adds: transformers holds it in the model dtype and casts it to compute_dtype per
        # forward (was cast from the checkpoint straight to compute_dtype: fp16 -> bf16 differed by double rounding)
        assert torch.equal(module.compute_bias(), their_bias.to(DTYPES[compute])), (compute, key)
        assert written[key].dtype == theirs[key].dtype == DTYPES[dtype], (compute, key)  # was compute_dtype
        assert torch.equal(written[key], theirs[key]), (compute, key)  # held in the model dtype since parity 6
    back = load_model(tmp_path / "ours", dtype="auto")
    save_quantized(back, tmp_path / "again")
    again = _file_tensors(tmp_path / "again")
    assert written.keys() == again.keys()
    for key, t in written.items():
        assert t.dtype == again[key].dtype and torch.equal(t, again[key]), key
    for key in biases:
        module = key.removesuffix(".bias")
        assert torch.equal(back.get_submodule(module).bias, ours.get_submodule(module).bias), key


# 4. revision

def _hub_with_revisions(monkeypatch, tmp_path, main_source: str, tagged_source: str):
    """A hub cache (offline) holding org/tiny with refs/main -> main_source's files and refs/v1 -> tagged_source's;
    returns v1's commit hash."""
    cache = _hub_cache(monkeypatch, tmp_path)
    main, tagged = _revision(), _revision()
    _add_snapshot(cache, "org/tiny", tagged_source, tagged)
    _add_snapshot(cache, "org/tiny", main_source, main)  # writes refs/main
    (cache / "models--org--tiny" / "refs" / "v1").write_text(tagged)
    return tagged


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_takes_a_hub_revision(monkeypatch, tmp_path, checkpoints):
    tagged = _hub_with_revisions(monkeypatch, tmp_path, checkpoints("gqa"), checkpoints("mha_bias"))
    main, biased = load_model(checkpoints("gqa")), load_model(checkpoints("mha_bias"))
    assert _same_weights(load_model("org/tiny"), main)
    assert _same_weights(load_model("org/tiny", revision="main"), main)
    for revision in ("v1", tagged):  # a tag, and the commit it names
        model = load_model("org/tiny", revision=revision)  # was: unknown option(s) ['revision']
        assert model.config.attention_bias and _same_weights(model, biased)


def test_load_tokenizer_takes_a_hub_revision(monkeypatch, tmp_path):
    main = _qwen_tokenizer(tmp_path / "main", {"eos_token": "<|im_end|>"})
    tagged = _qwen_tokenizer(tmp_path / "tagged", {"eos_token": "<|endoftext|>"})
    commit = _hub_with_revisions(monkeypatch, tmp_path, str(main), str(tagged))
    assert load_tokenizer("org/tiny").eos_id == 2
    for revision in ("v1", commit):
        assert load_tokenizer("org/tiny", revision=revision).eos_id == 0  # was a TypeError: unexpected keyword


def test_a_revision_missing_from_the_cache_offline_is_one_line_naming_it(monkeypatch, tmp_path, checkpoints):
    _hub_with_revisions(monkeypatch, tmp_path, checkpoints("gqa"), checkpoints("mha_bias"))
    revision = random.choice(["v2", _revision()])
    with pytest.raises(FileNotFoundError, match=rf"^'org/tiny' is not a local directory, and as a hub id at "
                                                rf"revision '{revision}' it is not in the local Hugging Face cache"
                       ) as error:
        load_model("org/tiny", revision=revision)
    _assert_one_line(error)


@pytest.mark.parametrize("revision", ["", 5, b"main", ["main"]])
def test_a_revision_that_is_not_one_is_refused_in_one_line(checkpoints, revision):
    with pytest.raises(ValueError, match=rf"^revision={revision!r} is not a revision; valid: a branch, tag or commit "
                                         rf"hash of the hub repo, or None \(main\)$".replace("[", r"\[")) as error:
        load_model("org/tiny", revision=revision)
    _assert_one_line(error)


def test_a_revision_with_a_local_directory_is_refused_in_one_line(checkpoints):
    path = checkpoints("gqa")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ValueError, match=rf"^revision='v1' picks a version of a hub id, but .*/gqa is a local "
                                             rf"directory; valid: revision=None for a local directory$") as error:
            load(path, revision="v1")
        _assert_one_line(error)


# 5. generate past max_position_embeddings: not refused, as transformers only warns and the positions are RoPE's

def test_generate_past_max_position_embeddings_equals_transformers(tmp_path):
    reference = hf_model(num_hidden_layers=1, max_position_embeddings=16)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    prompt = torch.randint(3, 96, (2, random.randint(8, 16)))
    new = random.randint(17, 24)  # prompt + new tokens past the 16 positions
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, max_new_tokens=new, eos_ids=()), expected)
