"""`load_tokenizer`: sentencepiece `tokenizer.model` (Llama 1/2, TinyLlama) or `tokenizer.json` (Llama 3, SmolLM).

Both kinds expose `.encode(text) -> list[int]`, `.decode(ids) -> str`, `.bos_id`, `.eos_id`, `.pad_id`, and
`.eos_ids` (every id that ends generation). Special tokens come, in this order of precedence, from
`tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `add_bos_token`, `add_eos_token`),
`generation_config.json` (`bos_token_id`, `eos_token_id` int or list, `pad_token_id`), then the tokenizer itself.
Llama has no pad token; `pad_id` then falls back to `eos_id`, which is safe because padded positions are masked.
`tokenizer.json` needs the optional `tokenizers` package (`pip install nf4lora[tokenizers]`).
"""

from __future__ import annotations

import os

from .checkpoint import TOKENIZER_FILES, resolve_model_dir
from nf4lora.jsonfile import read_json_object


def _read_json(path: str) -> dict:
    return read_json_object(path) if os.path.isfile(path) else {}


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class _SpecialTokens:
    """bos/eos/pad ids and add-bos/eos flags resolved from the JSON files next to the tokenizer."""

    def __init__(self, model_dir: str, token_to_id, defaults: dict):
        tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen_cfg = _read_json(os.path.join(model_dir, "generation_config.json"))

        def resolve(name: str) -> int | None:
            text = _token_text(tok_cfg.get(f"{name}_token"))
            ident = token_to_id(text) if text is not None else None
            if ident is None:
                gen = gen_cfg.get(f"{name}_token_id")
                ident = gen[0] if isinstance(gen, list) else gen
            return defaults.get(name) if ident is None else ident

        self.bos_id, self.eos_id, self.pad_id = resolve("bos"), resolve("eos"), resolve("pad")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        gen_eos = gen_cfg.get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = tuple(dict.fromkeys(i for i in [self.eos_id, *extra] if i is not None))
        self.add_bos = tok_cfg.get("add_bos_token")
        self.add_eos = tok_cfg.get("add_eos_token")

    def ids(self) -> tuple:
        return self.bos_id, self.eos_id, self.pad_id, self.eos_ids


class SentencePieceTokenizer:
    """A sentencepiece `tokenizer.model`; adds BOS by default (Llama), EOS only when the config says so."""

    def __init__(self, model_dir: str):
        import sentencepiece as spm

        self.path = os.path.join(model_dir, "tokenizer.model")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from None

        def token_to_id(text: str) -> int | None:
            ident = self.sp.piece_to_id(text)
            return None if ident == self.sp.unk_id() and text != self.sp.id_to_piece(ident) else ident

        def own(ident: int) -> int | None:
            return ident if ident >= 0 else None

        own_ids = {"bos": own(self.sp.bos_id()), "eos": own(self.sp.eos_id()), "pad": own(self.sp.pad_id())}
        special = _SpecialTokens(model_dir, token_to_id, own_ids)
        self.bos_id, self.eos_id, self.pad_id, self.eos_ids = special.ids()
        self.add_bos = True if special.add_bos is None else special.add_bos
        self.add_eos = bool(special.add_eos)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS/EOS per the config unless `bos`/`eos` say otherwise."""
        ids = self.sp.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if (self.add_eos if eos is None else eos) and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`; control tokens (BOS, EOS, pad) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A `tokenizers` `tokenizer.json`; its post-processor adds BOS/EOS unless tokenizer_config.json overrides."""

    def __init__(self, model_dir: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"{model_dir}/tokenizer.json needs the optional 'tokenizers' package: "
                              f"pip install 'nf4lora[tokenizers]'") from e
        self.path = os.path.join(model_dir, "tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the tokenizers package raises a bare Exception that does not name the file
            raise ValueError(f"{self.path}: not a tokenizers file ({e})") from None
        special = _SpecialTokens(model_dir, self.tok.token_to_id, {})
        self.bos_id, self.eos_id, self.pad_id, self.eos_ids = special.ids()
        self.add_bos, self.add_eos = special.add_bos, special.add_eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`: the post-processor's specials, then BOS/EOS forced on or off where asked."""
        ids = self.tok.encode(text, add_special_tokens=True).ids
        want_bos = self.add_bos if bos is None else bos
        want_eos = self.add_eos if eos is None else eos
        has_bos = bool(ids) and self.bos_id is not None and ids[0] == self.bos_id
        has_eos = bool(ids) and self.eos_id is not None and ids[-1] == self.eos_id
        if want_bos is not None and self.bos_id is not None and want_bos != has_bos:
            ids = [self.bos_id, *ids] if want_bos else ids[1:]
        if want_eos is not None and self.eos_id is not None and want_eos != has_eos:
            ids = [*ids, self.eos_id] if want_eos else ids[:-1]
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path_or_id) -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer of a local model directory or hub id: `tokenizer.model` if present, else `tokenizer.json`."""
    model_dir = resolve_model_dir(path_or_id, TOKENIZER_FILES)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        return SentencePieceTokenizer(model_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(model_dir)
    raise FileNotFoundError(f"{model_dir} has neither tokenizer.model (sentencepiece) nor tokenizer.json (tokenizers)")
