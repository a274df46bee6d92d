"""`LlamaConfig`: the architecture hyper-parameters, read from and written to Hugging Face `config.json`.

One typed dataclass covers Llama 1/2/3/3.x and the models that share `LlamaForCausalLM`'s config (TinyLlama,
SmolLM, Mistral-style GQA without a sliding window, or with one no shorter than the inputs). `from_hf_dict` accepts
both config dialects that exist on the hub: transformers < 5 (`rope_theta` + `rope_scaling`) and transformers >= 5
(`rope_parameters`). `to_hf_dict` writes both, so either version of transformers reads our checkpoints.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields

from nf4lora.jsonfile import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
HIDDEN_ACTS = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU
# The special-token ids that generation_config.json may set; where it does, transformers' generate uses them.
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# transformers' MistralConfig defaults where they differ from LlamaConfig's: a Mistral config.json without these keys
# means these values (a missing sliding_window is a 4096-token window, not none)
_MISTRAL_DEFAULTS = {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "sliding_window": 4096}


@dataclass
class LlamaConfig:
    """Architecture of a Llama-family decoder. Field names and meanings follow transformers' `LlamaConfig`.

    `extra` keeps the config.json keys without a field here (e.g. `quantization_config`); it is not compared.
    `rope_scaling` is None for plain RoPE, or a dict with `rope_type` in `ROPE_TYPES` and that type's parameters
    (`factor` for "linear"; `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`
    for "llama3", whose `original_max_position_embeddings` defaults to `max_position_embeddings` as in transformers
    5). `eos_token_id` may be a list (Llama 3 instruct stops on several ids). `sliding_window` (None, or at least
    `max_position_embeddings`) is not applied: `Llama.forward` refuses inputs longer than it.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly or fix the head count"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; valid: {list(HIDDEN_ACTS)}")
        window = self.sliding_window
        if window is not None and not (_is_int(window) and window >= self.max_position_embeddings):
            raise ValueError(f"sliding_window={window!r} attention is not supported; valid: null (or an int "
                             f">= max_position_embeddings={self.max_position_embeddings})")
        for name in ("rms_norm_eps", "rope_theta"):
            _check_positive_number(name, getattr(self, name))
        # a truthy string such as "false" would otherwise tie the head or add biases the checkpoint lacks
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        check_token_ids({name: getattr(self, name) for name in GENERATION_IDS})
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (empty when the config names none)."""
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> LlamaConfig:
        """Build from a parsed Hugging Face `config.json`; `source` names the file in error messages."""
        archs = raw.get("architectures")
        model_type = raw.get("model_type")
        if archs is not None and not (isinstance(archs, list) and (
                not archs or any(a in SUPPORTED_ARCHITECTURES for a in archs))):
            raise ValueError(
                f"{source}: architectures={archs!r} is not supported; valid: a list holding one of "
                f"{list(SUPPORTED_ARCHITECTURES)}")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; valid: {list(SUPPORTED_MODEL_TYPES)}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        names = {f.name for f in fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        kwargs = {k: raw[k] for k in names if k in raw}
        if model_type == "mistral" or (model_type is None and archs and "MistralForCausalLM" in archs):
            kwargs = {**_MISTRAL_DEFAULTS, **kwargs}
        # transformers >= 5 reads a set rope_scaling before rope_parameters (its own dialect: theta and scaling in
        # one dict), and theta from that dict before the top-level rope_theta; so do we
        rope_key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
        rope = raw.get(rope_key) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: {rope_key}={rope!r} must be a dict or null")
        rope = dict(rope)
        kwargs["rope_theta"] = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        # transformers >= 5 moves two top-level keys into the RoPE parameters: partial_rotary_factor where the dict
        # sets none, and (llama3) original_max_position_embeddings over the dict's own
        if "partial_rotary_factor" in raw:
            rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
        if "original_max_position_embeddings" in raw and _rope_type(rope) == "llama3":
            rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        kwargs["rope_scaling"] = rope or None
        kwargs["extra"] = {k: v for k, v in raw.items()
                           if k not in names and k not in ("rope_theta", "rope_scaling", "rope_parameters")}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LlamaConfig:
        """Read `config.json` (or a directory holding one); errors name the file and what is wrong."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}; a Hugging Face model directory needs one")
        return cls.from_hf_dict(read_json_object(path), source=path)

    def update_from_generation_config(self, model_dir: str | os.PathLike) -> None:
        """Take the bos/eos/pad ids that `generation_config.json` in `model_dir` sets, if it exists: transformers'
        generate stops at its ids (Llama 3 instruct lists <|eot_id|> there), not at config.json's."""
        path = os.path.join(os.fspath(model_dir), "generation_config.json")
        if not os.path.isfile(path):
            return
        raw = read_json_object(path)
        ids = {name: raw[name] for name in GENERATION_IDS if raw.get(name) is not None}
        try:
            check_token_ids(ids)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        for name, value in ids.items():
            setattr(self, name, value)

    def to_hf_dict(self) -> dict:
        """A `config.json` dict for transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`)."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(architectures=["LlamaForCausalLM"], model_type="llama")
        out["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                  **{k: v for k, v in (self.rope_scaling or {}).items() if k != "rope_type"}}
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


def _check_positive_number(name: str, value) -> None:
    """Refuse what is not a finite real > 0 (strings, null, booleans and NaN included), naming `name`."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def check_token_ids(ids: dict) -> None:
    """Refuse special-token ids {name: value} that are not an int or null (eos_token_id: also a list of ints)."""
    for name, value in ids.items():
        if name == "eos_token_id" and isinstance(value, list):
            valid_value = all(_is_int(v) for v in value)
        else:
            valid_value = value is None or _is_int(value)
        if not valid_value:
            valid = "an int, a list of ints or null" if name == "eos_token_id" else "an int or null"
            raise ValueError(f"{name}={value!r} is not a token id; valid: {valid}")


def _rope_type(scaling: dict) -> str:
    """The RoPE type a rope_scaling / rope_parameters dict names: `rope_type`, else transformers 4's `type`."""
    return scaling.get("rope_type") or scaling.get("type") or "default"


def _normalize_rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """Validate `rope_scaling` and return it with `rope_type` set, or None for plain RoPE."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} must be a dict or null")
    scaling = dict(scaling)
    rope_type = _rope_type(scaling)
    scaling.pop("rope_type", None)
    scaling.pop("type", None)
    rotary = scaling.pop("partial_rotary_factor", 1)
    # transformers' Llama ignores it for plain RoPE and fails on it for scaled RoPE: neither rotates part of the head
    if not (isinstance(rotary, numbers.Real) and not isinstance(rotary, bool) and rotary == 1):
        raise ValueError(f"partial_rotary_factor={rotary!r} is not supported (Llama rotates the whole head); valid: 1")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; valid: {list(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    needed = ("factor",) if rope_type == "linear" else _LLAMA3_ROPE_KEYS
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}")
    for key in needed:
        if key == "original_max_position_embeddings":
            _check_positive_int(f"rope_scaling {key}", scaling[key])
        else:
            _check_positive_number(f"rope_scaling {key}", scaling[key])
    return {"rope_type": rope_type, **scaling}
