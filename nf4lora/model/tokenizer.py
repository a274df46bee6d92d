"""`load_tokenizer`: sentencepiece `tokenizer.model` (Llama 1/2, TinyLlama) or `tokenizer.json` (Llama 3, SmolLM).

Both kinds expose `.encode(text) -> list[int]`, `.decode(ids) -> str`, `.bos_id`, `.eos_id`, `.pad_id`, and
`.eos_ids` (every id that ends generation). Special tokens come, in this order of precedence, from
`tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `add_bos_token`, `add_eos_token`),
`generation_config.json` (`eos_token_id` int or list, `pad_token_id`; a negative id means none; never its
`bos_token_id`: transformers reads no BOS there, and a tokenizer that adds none, Falcon's, is trained without one),
then the tokenizer itself (a `tokenizer.model`'s BOS/EOS/pad; the ids a `tokenizer.json` post-processor puts
before/after the text); tokenizer_config.json's `"bos_token": null` (Qwen's) means no BOS, as in transformers: `bos_id`
is None and encode adds none (a null EOS or pad is looked up further). As in transformers, `special_tokens_map.json`'s
`bos_token`/`eos_token`/`pad_token` override tokenizer_config.json's when that has no `added_tokens_decoder` (older
checkpoints). Llama has no pad token; `pad_id` then falls back to `eos_id`, which is safe because padded positions
are masked. Values of the wrong type in these files are a one-line ValueError naming the file, key and value.
Special tokens written in the text (`</s>`, `<|eot_id|>`) encode to their ids, as in transformers; so do the tokens a
fine-tune added past a `tokenizer.model` (ChatML's `<|im_start|>`), which tokenizer.json's `added_tokens` and
tokenizer_config.json's `added_tokens_decoder` list, found as transformers' tokenizers library finds them: those
marked `normalized: false` first, then the `normalized` ones in the text between, leftmost-longest, a `single_word`
one only where no word character touches it, each taking the whitespace on its left/right with it where it is marked
`lstrip`/`rstrip` (a converted Llama tokenizer has no normalizer, so `normalized` changes only that order). Intentional
differences from transformers: a `tokenizer.json` without a configured BOS/EOS has its post-processor's as `bos_id`/
`eos_id` (transformers: None; encode adds the same ids), and else generation_config.json's EOS, which the trainer
appends (transformers: None), `add_bos_token`/`add_eos_token` are honoured for a `tokenizer.json` too (transformers 5
ignores them unless the tokenizer class rewrites its post-processor), leading whitespace (or a leading "▁") in a
sentencepiece text keeps sentencepiece's dummy-prefix space (transformers 5 drops it), and `decode` always skips special
tokens: the tokenizer's own, the configured BOS/EOS/pad and those `added_tokens_decoder` marks. `decode` also skips
ids past the vocabulary (a model's embedding may be padded past it; transformers skips them too) and refuses negative
ids.
`tokenizer.json` needs the optional `tokenizers` package (`pip install nf4lora[tokenizers]`).
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import NamedTuple

from .checkpoint import TOKENIZER_FILES, resolve_model_dir
from .config import GENERATION_IDS, check_token_ids
from nf4lora.jsonfile import read_json_object


# What the tokenizers library strips next to an added token marked lstrip/rstrip: Rust's char::is_whitespace, the
# Unicode White_Space set (str.isspace() also counts U+001C..U+001F, which tokenizers keeps).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
              "\u2028\u2029\u202f\u205f\u3000"
# Beside letters, Rust's Unicode \w (what a single_word token must not touch) counts decimal digits, every
# mark, connector punctuation, letter number, the joiners and the circled and squared letters (Other_Alphabetic).
_WORD_CATEGORIES = {"Mn", "Mc", "Me", "Nd", "Nl", "Pc"}
_WORD_EXTRA = {"\u200c", "\u200d", *map(chr, range(0x24B6, 0x24EA)), *map(chr, range(0x1F130, 0x1F14A)),
               *map(chr, range(0x1F150, 0x1F16A)), *map(chr, range(0x1F170, 0x1F18A))}


class _AddedToken(NamedTuple):
    """An added token's entry, as tokenizers' AddedToken: its text, whether it is special, whether it takes the
    whitespace on its left (`lstrip`) / right (`rstrip`) when split out of a text, whether it matches only where no
    word character touches it (`single_word`), and whether it is matched after the others, in the text between
    them (`normalized`; absent: true unless special)."""

    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False

    @classmethod
    def from_entry(cls, token: dict) -> _AddedToken:
        """The token of a JSON entry {"content": str, "special": bool, "lstrip": bool, ...}; a flag that is not true
        is false."""
        special = token.get("special") is True
        normalized = token["normalized"] is True if "normalized" in token else not special
        lstrip, rstrip, single_word = (token.get(flag) is True for flag in ("lstrip", "rstrip", "single_word"))
        return cls(token["content"], special, lstrip, rstrip, single_word, normalized)


def _is_word_char(char: str) -> bool:
    """Whether `char` is a word character of Rust's Unicode regex \\w, which tokenizers' single_word checks."""
    return char.isalpha() or char in _WORD_EXTRA or unicodedata.category(char) in _WORD_CATEGORIES


def _read_json(path: str) -> dict:
    return read_json_object(path) if os.path.isfile(path) else {}


def _token_text(path: str, key: str, value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}; anything else is refused."""
    text = value.get("content") if isinstance(value, dict) else value
    if value is not None and not isinstance(text, str):
        raise ValueError(f"{path}: {key}={value!r} is not a token; valid: a string, {{\"content\": string}} or null")
    return text


def _flag(path: str, config: dict, key: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{path}: {key}={value!r} is not a flag; valid: true, false or null")
    return value


def _plain_ids(ids, special_ids: set, vocab_size: int) -> list[int]:
    """`ids` as ints without the special ones and those past the vocabulary (a model's embedding may be padded past
    it; transformers skips them too); a negative id (a -100 label, say) is refused."""
    ids = [int(i) for i in ids]
    if any(i < 0 for i in ids):
        raise ValueError(f"cannot decode negative token id {min(ids)}; valid: 0..{vocab_size - 1}")
    return [i for i in ids if i not in special_ids and i < vocab_size]


def _added_token_entries(path: str, key: str, entries) -> dict[int, _AddedToken]:
    """{id: _AddedToken} of tokenizer.json's `added_tokens` ([{"id": int, "content": str, "special": bool, "lstrip":
    bool, "rstrip": bool}]) or tokenizer_config.json's `added_tokens_decoder` ({"<id>": {"content": str, ...}});
    transformers skips the special ones in decode even where tokenizer.json does not mark them."""
    try:
        pairs = entries.items() if isinstance(entries, dict) else ((token["id"], token) for token in entries)
        tokens = {int(i): _AddedToken.from_entry(token) for i, token in pairs}
    except (AttributeError, KeyError, TypeError, ValueError):
        tokens = None
    if tokens is None or not all(isinstance(token.content, str) for token in tokens.values()):
        valid = '{"<id>": {"content": string, "special": bool}}' if key == "added_tokens_decoder" else \
            '[{"id": int, "content": string, "special": bool}]'
        raise ValueError(f"{path}: {key}={repr(entries)[:200]} does not list added tokens; valid: {valid}")
    return tokens


class _SpecialTokens:
    """bos/eos/pad ids and add-bos/eos flags resolved from the JSON files next to the tokenizer."""

    def __init__(self, model_dir: str, token_to_id, defaults: dict, added: dict | None = None):
        """`defaults`: {"bos"/"eos"/"pad": id or None}, the tokenizer's own; `added`: {id: _AddedToken} of tokens the
        tokenizer lacks; `added_tokens_decoder`'s join them."""
        tok_path = os.path.join(model_dir, "tokenizer_config.json")
        tok_cfg = _read_json(tok_path)
        self.added = {**(added or {}), **_added_token_entries(
            tok_path, "added_tokens_decoder", tok_cfg.get("added_tokens_decoder", {}))}
        added_ids = {token.content: i for i, token in self.added.items()}
        token_paths = {}
        if "added_tokens_decoder" not in tok_cfg:  # where transformers reads the legacy file, and lets it win
            map_path = os.path.join(model_dir, "special_tokens_map.json")
            legacy = {k: v for k, v in _read_json(map_path).items() if k in ("bos_token", "eos_token", "pad_token")}
            tok_cfg.update(legacy)
            token_paths = dict.fromkeys(legacy, map_path)
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen_cfg = {name: value for name, value in _read_json(gen_path).items() if name in GENERATION_IDS}
        try:
            check_token_ids(gen_cfg)
        except ValueError as e:
            raise ValueError(f"{gen_path}: {e}") from None
        # each as a list; a negative id (Llama 1 conversions write pad_token_id -1) means none, as in sentencepiece
        gen_ids = {name: [i for i in (value if isinstance(value, list) else [value]) if i is not None and i >= 0]
                   for name, value in gen_cfg.items()}

        def resolve(name: str) -> int | None:
            key = f"{name}_token"
            if name == "bos" and key in tok_cfg and tok_cfg[key] is None:
                return None  # Qwen's: no BOS, as in transformers (neither generation_config.json's nor the .model's)
            text = _token_text(token_paths.get(key, tok_path), key, tok_cfg.get(key))
            ident = token_to_id(text) if text is not None else None
            if ident is None:
                ident = added_ids.get(text)
            if ident is None and name != "bos":  # transformers reads no BOS there, and a model may use none
                ident = next(iter(gen_ids.get(f"{name}_token_id", [])), None)
            return defaults.get(name) if ident is None else ident

        self.bos_id, self.eos_id, self.pad_id = resolve("bos"), resolve("eos"), resolve("pad")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.marked_special = {i for i, token in self.added.items() if token.special}
        eos_ids = [self.eos_id, *gen_ids.get("eos_token_id", [])]
        self.eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self.add_bos = _flag(tok_path, tok_cfg, "add_bos_token")
        self.add_eos = _flag(tok_path, tok_cfg, "add_eos_token")
        self.legacy = _flag(tok_path, tok_cfg, "legacy")

    def ids(self) -> tuple:
        return self.bos_id, self.eos_id, self.pad_id, self.eos_ids

    def special_ids(self) -> set[int]:
        """The configured BOS/EOS/pad and the special added tokens: transformers marks them special."""
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None} | self.marked_special


# A serialized ModelProto field 3 (normalizer_spec) holding only NormalizerSpec field 3 (add_dummy_prefix) = false.
# Protobuf merges a repeated message field into the earlier one, so appending this to a model turns its dummy prefix
# off and keeps the rest: how the text after a special token is encoded (the "<unk>"-prefix trick of transformers'
# slow tokenizer lost characters when BPE merged across its ">").
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


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
        json_path = os.path.join(model_dir, "tokenizer.json")
        json_added = _added_token_entries(json_path, "added_tokens", _read_json(json_path).get("added_tokens", []))
        special = _SpecialTokens(model_dir, token_to_id, own_ids, json_added)
        self.bos_id, self.eos_id, self.pad_id, self.eos_ids = special.ids()
        self.add_bos = True if special.add_bos is None else special.add_bos
        self.add_eos = bool(special.add_eos)
        self.special_ids = {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids.update(special.special_ids())
        # Like transformers, "<s>", "</s>", "<unk>" and the added tokens (a fine-tune's ChatML "<|im_start|>"; one the
        # .model has too is split out all the same) written in the text are those tokens (sentencepiece alone would
        # spell them out), and the text after one gets sentencepiece's dummy-prefix space only if `legacy` is true.
        added = {token.content: i for i, token in special.added.items() if token.content}
        self._split_ids = {self.sp.id_to_piece(i): i for i in self.special_ids if i < self.vocab_size} | added
        # the .model's own specials match as tokenizers' special tokens do: not normalized, no flags
        listed = {token.content: token for token in special.added.values()}
        self._tokens = {text: listed.get(text, _AddedToken(text, True)) for text in self._split_ids}
        self._token_res = [_alternation([text for text, token in self._tokens.items() if token.normalized == wanted])
                           for wanted in (False, True)]
        no_prefix = spm.SentencePieceProcessor(model_proto=self.sp.serialized_model_proto() + _NO_DUMMY_PREFIX)
        self._sp_after_special = self.sp if special.legacy else no_prefix
        # decode writes an added token that is not special as the .model's pieces that spell it
        self._spellings = {i: no_prefix.encode(content) for content, i in added.items()
                           if i not in self.special_ids and token_to_id(content) is None}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS/EOS per the config unless `bos`/`eos` say otherwise."""
        ids = []
        for k, part in enumerate(self._split(text)):
            if k % 2:
                ids.append(self._split_ids[part])
            elif part:
                ids += self._encode_plain(part, after_special=k > 0)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if (self.add_eos if eos is None else eos) and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def _split(self, text: str) -> list[str]:
        """`text` as [plain, token, plain, ..., plain], as tokenizers' AddedVocabulary splits it: the tokens not
        normalized first, then the normalized ones in each plain stretch between."""
        exact, normalized = self._token_res
        parts = self._find_tokens(text, exact)
        return [found for k, part in enumerate(parts) for found in ([part] if k % 2 else
                                                                     self._find_tokens(part, normalized))]

    def _find_tokens(self, text: str, token_re: re.Pattern | None) -> list[str]:
        """`text` as [plain, token, plain, ..., plain] by the tokens `token_re` matches (leftmost-longest, one match
        after another): a single_word token is skipped where a word character touches it, and the whitespace beside
        a token that strips it (lstrip/rstrip) leaves the plain text."""
        if token_re is None:
            return [text]
        parts, done = [], 0
        for match in token_re.finditer(text):
            start, stop = match.span()
            token = self._tokens[match.group()]
            if token.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                      or (stop < len(text) and _is_word_char(text[stop]))):
                continue
            if token.lstrip:
                start = max(len(text[:start].rstrip(_WHITESPACE)), done)
            if token.rstrip:
                stop = len(text) - len(text[stop:].lstrip(_WHITESPACE))
            parts += [text[done:start], token.content]
            done = stop
        return [*parts, text[done:]]

    def _encode_plain(self, text: str, after_special: bool) -> list[int]:
        """sentencepiece's ids of `text`, which holds no special token; after one, without the dummy-prefix space
        unless `legacy`."""
        return (self._sp_after_special if after_special else self.sp).encode(text)

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens (BOS, EOS, pad, unk, other control pieces, special added tokens) decode to
        nothing."""
        spelt = [piece for i in map(int, ids) for piece in self._spellings.get(i, (i,))]
        return self.sp.decode(_plain_ids(spelt, self.special_ids, self.vocab_size))


def _alternation(texts: list[str]) -> re.Pattern | None:
    """A pattern matching any of `texts`, the longest first (so leftmost-longest, as tokenizers' matcher); None for
    none."""
    return re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None


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
        special = _SpecialTokens(model_dir, self.tok.token_to_id, self._post_processor_ids())
        self.bos_id, self.eos_id, self.pad_id, self.eos_ids = special.ids()
        self.add_bos, self.add_eos = special.add_bos, special.add_eos
        self.special_ids = special.special_ids()  # tokenizer.json's own special tokens are skipped by decode itself

    def _post_processor_ids(self) -> dict[str, int | None]:
        """{"bos": the id the post-processor puts before a text, "eos": the one it puts after it}, each None where it
        puts none (a text of no token gets only a BOS)."""
        enc = self.tok.encode("a", add_special_tokens=True)
        text_at = [k for k, s in enumerate(enc.sequence_ids) if s is not None]
        head = enc.ids[:text_at[0]] if text_at else enc.ids
        tail = enc.ids[text_at[-1] + 1:] if text_at else []
        return {"bos": head[0] if head else None, "eos": tail[-1] if tail else None}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`: the post-processor's specials, then BOS/EOS forced on or off where asked.

        Only the ids the post-processor added are ever dropped: a BOS or EOS written literally in `text` (split out
        as one id, as transformers does) stays."""
        enc = self.tok.encode(text, add_special_tokens=True)
        ids, added = enc.ids, [s is None for s in enc.sequence_ids]
        want_bos = self.add_bos if bos is None else bos
        want_eos = self.add_eos if eos is None else eos
        has_bos = bool(ids) and added[0] and ids[0] == self.bos_id
        has_eos = len(ids) > has_bos and added[-1] and ids[-1] == self.eos_id  # not the BOS when bos == eos
        if want_bos is not None and self.bos_id is not None and want_bos != has_bos:
            ids = [self.bos_id, *ids] if want_bos else ids[1:]
        if want_eos is not None and self.eos_id is not None and want_eos != has_eos:
            ids = [*ids, self.eos_id] if want_eos else ids[:-1]
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens (tokenizer.json's, the configured BOS/EOS/pad, `added_tokens_decoder`'s)
        skipped."""
        return self.tok.decode(_plain_ids(ids, self.special_ids, self.vocab_size), skip_special_tokens=True)


def load_tokenizer(path_or_id, revision: str | None = None) -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer of a local model directory or hub id (at `revision`, a branch, tag or commit hash; None: main):
    `tokenizer.model` if present, else `tokenizer.json`."""
    model_dir = resolve_model_dir(path_or_id, TOKENIZER_FILES, revision)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        return SentencePieceTokenizer(model_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(model_dir)
    raise FileNotFoundError(f"{model_dir} has neither tokenizer.model (sentencepiece) nor tokenizer.json (tokenizers)")
