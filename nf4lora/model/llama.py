"""The Llama decoder in plain PyTorch: RMSNorm, RoPE, grouped-query SDPA attention, SwiGLU, a static KV cache.

Module names mirror transformers' `LlamaForCausalLM` exactly (`model.embed_tokens`, `model.layers.{i}.self_attn.
{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`, the two layer norms, `model.norm`, `lm_head`), so HF
state dicts and peft adapter keys map 1:1. Linear layers are ordinary submodules: the loader swaps `nn.Linear` for
`NF4Linear`, and LoRA wraps either, without this file knowing (a layer class may define `forward_group` to compute
several layers that read the same input at once, as NF4Linear does for a decode step's q/k/v).

Masks accepted by `Llama.forward` (True / 1 = may attend):
- `attention_mask` (B, L) 0/1 padding mask over the keys, combined with causality (as transformers does);
- `attention_mask` (B or 1, 1 or H, T, T) bool or additive float, used exactly as given (it must encode causality);
- `segment_ids` (B, T) int: packed examples, each a run of equal ids (an id may come back later: a new example); a
  token attends only to earlier tokens of its own run, and when `position_ids` is not given positions restart at 0
  at every run start.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nf4lora.kernels.dispatch import use_triton

from .config import LlamaConfig
from .rope import apply_rope, rope_cos_sin, rope_inv_freq


_SDPA_GQA: list[bool] = []  # filled on first use (no import-time work); a plain global so torch.compile traces it


def _sdpa_has_gqa() -> bool:
    """`enable_gqa` arrived in torch 2.5; older versions get an explicit repeat of k and v."""
    if not _SDPA_GQA:
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
        _SDPA_GQA.append((major, minor) >= (2, 5))
    return _SDPA_GQA[0]


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)); the normalization in float32, cast back to x's dtype before the scale (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """weight * rms_norm(x). With `residual`: (residual + x, weight * rms_norm(residual + x)), the sum in x's
        dtype: a decoder layer's residual add and its next norm, one kernel on the inference path."""
        if _inference_kernels(x, self.weight, residual):
            from nf4lora.kernels import rms_norm

            if rms_norm.supports(x, self.weight, residual):
                if residual is None:
                    return rms_norm.rms_norm(x, self.weight, self.eps)
                return rms_norm.add_rms_norm(residual, x, self.weight, self.eps)
        if residual is None:
            return self._normalize(x)
        total = residual + x
        return total, self._normalize(total)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel on CUDA where torch has one; on float32 input it equals HF's formula.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _inference_kernels(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the fused inference kernels (RMSNorm, RoPE + cache write, SiLU * up, decode attention) take a call on
    x and the other tensors they read (None skipped): the Triton path on x's device, nothing to differentiate (none
    of them has autograd), and not traced by torch.compile (which fuses these ops itself)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return False
    return not torch.compiler.is_compiling() and use_triton(x.device)


class LayerInputs(NamedTuple):
    """What every decoder layer of one forward call reads besides the hidden state (`Llama.embed_inputs`)."""

    position_ids: torch.Tensor  # (B, T) or (1, T) int64
    mask: torch.Tensor | None  # bool (True = may attend) or additive, broadcast to (B, heads, T, n_keys); None: none
    is_causal: bool  # attention among the T new tokens is causal (with mask None)
    kv_slots: list | None  # per layer the (k, v) caches, each (B, n_kv_heads, max_len, head_dim); None: no cache
    cache_position: torch.Tensor  # (T,) int64 cache slots the new keys/values go to
    n_keys: int  # cache slots (or, without a cache, tokens) attended


class KVCache:
    """Preallocated keys/values for every layer: k[i], v[i] (B, n_kv_heads, max_len, head_dim) in `dtype`, which
    must be the model's (`Llama.forward` refuses another: the decode kernels and SDPA take one dtype).

    `key_mask` (B, max_len) bool marks slots holding real tokens (False for left padding). `seen` counts the slots
    written by calls that let the model choose the slots (`cache_position=None`). Fixed shapes make a decode step
    capturable in a CUDA graph when the caller passes `cache_position` as a tensor.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype, devices,
                 mask_device=None):
        """`devices`: each layer's device, where its k and v go; `mask_device`: key_mask's, default devices[0]."""
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        mask_device = devices[0] if mask_device is None else mask_device
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=mask_device)
        self.has_padding = False
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        self.seen = 0

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Record a (B, L) 0/1 mask for slots [0, L); later slots stay valid."""
        self.key_mask[:, : attention_mask.shape[1]] = attention_mask.bool()
        self.has_padding = True


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x, cos, sin, mask, is_causal, kv=None, cache_position=None, n_keys=None):
        """x (B, T, hidden) -> (B, T, hidden). `kv` = (k_cache, v_cache) buffers written at `cache_position` (T,),
        of which the first `n_keys` slots (all when None) are attended."""
        b, t, _ = x.shape
        q, k, v = _same_input((self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = _rope_and_cache(q, k, v, cos, sin, is_causal, kv, cache_position, n_keys)
        out = _sdpa(q, k, v, mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def _rope_and_cache(q, k, v, cos, sin, is_causal, kv, cache_position, n_keys):
    """Rotate q (B, T, H, D) and k (B, T, H_kv, D), write k and v into the cache `kv` at `cache_position`, and return
    q, k, v as (B, heads, keys, D) for attention: the cache's first `n_keys` slots, or a causal prefill's own k, v."""
    if kv is not None and _inference_kernels(q, k, v):
        from nf4lora.kernels import rope_cache

        if rope_cache.supports(q, k, v, cos, *kv):
            k_cache, v_cache = kv
            q = rope_cache.rope_into_cache(q, k, v, cos, sin, k_cache, v_cache, cache_position)
            # a causal prefill starts at slot 0 with n_keys = T: the slots just written
            return q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is not None:
        k_cache, v_cache = kv
        k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
        if not is_causal:  # attend the cache; a causal prefill from slot 0 only needs its own k, v
            k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
    return q, k, v


def _same_input(layers, x):
    """``[layer(x) for layer in layers]``; layers of one class that defines ``forward_group(layers, x)`` (NF4Linear:
    one kernel launch for a decode step's q/k/v) are computed by it."""
    forward_group = getattr(type(layers[0]), "forward_group", None)
    if forward_group is not None and all(type(layer) is type(layers[0]) for layer in layers):
        return forward_group(list(layers), x)
    return [layer(x) for layer in layers]


def _sdpa(q, k, v, mask, is_causal):
    """Grouped-query SDPA: k, v carry n_kv_heads, broadcast to q's heads without a copy where torch allows. A decode
    step (one query row, nothing to differentiate) takes `decode_attention` on the Triton path where it is preferred,
    except under torch.compile: there the step keeps SDPA, as the kernel measured no gain in a compiled step (H200,
    Llama-2-7B shapes: compiled minus graphed eager step +0.29 ms/token with either attention)."""
    if q.shape[2] == 1 and not is_causal and _inference_kernels(q, k, v):
        from nf4lora.kernels import decode_attention

        if decode_attention.preferred(q, k, v, mask):
            return decode_attention.decode_attention(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if _sdpa_has_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _same_input((self.gate_proj, self.up_proj), x)
        if _inference_kernels(gate, up):
            from nf4lora.kernels import silu_mul

            if silu_mul.supports(gate, up):
                return self.down_proj(silu_mul.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def device(self) -> torch.device:
        return self.input_layernorm.weight.device

    def forward(self, x, pending, cos, sin, mask, is_causal, kv=None, cache_position=None, n_keys=None):
        """The hidden state (B, T, hidden) arrives as x + pending (pending None for the first layer) and leaves as
        the pair (x', mlp output): each residual add is left to the next norm, which does it in the same kernel."""
        if pending is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm(pending, residual=x)
        attn = self.self_attn(normed, cos, sin, mask, is_causal, kv, cache_position, n_keys)
        x, normed = self.post_attention_layernorm(attn, residual=x)
        return x, self.mlp(normed)


class LlamaModel(nn.Module):
    """The decoder stack, `model.*` in HF names: embed_tokens, layers, norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """Llama causal LM: `model(input_ids (B, T) int64) -> logits (B, T, vocab)` in the weights' dtype.

    `gradient_checkpointing` (bool attribute, default False) recomputes each decoder layer in backward while
    training. Layers may sit on different devices (see `loading.plan_device_map`); activations follow them.
    """

    def __init__(self, config: LlamaConfig, init_std: float = 0.02):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # computed on the CPU (real values even when built on meta), then placed with the weights: a model built
        # under `torch.device("cuda")` must not copy it to the GPU every step (nor inside a CUDA graph capture)
        inv_freq = rope_inv_freq(config, device="cpu")
        if self.lm_head.weight.device.type != "meta":
            inv_freq = inv_freq.to(self.lm_head.weight.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._inv_freq_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see _inv_freq_on
        self.gradient_checkpointing = False
        self.init_weights(init_std)
        self.tie_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) linears and embeddings, zero biases, unit norms (transformers' Llama init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with `model.embed_tokens.weight` when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens, in the model's dtype, on each
        layer's device; its key mask sits with the embeddings, where each call builds its attention mask."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, weight.dtype, [layer.device for layer in self.model.layers],
                       mask_device=weight.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, cache=None,
                cache_position=None, logits_to_keep: int = 0):
        """input_ids (B, T) int64 -> logits (B, T, vocab), or (B, logits_to_keep, vocab) for the last positions.
        Ids on the CPU must lie in [0, vocab_size) (ValueError otherwise).

        With `cache`, new keys/values go to slots `cache_position` (T,) int64; when None, the next `cache.seen`
        slots are used and attention reads only the filled prefix. With a tensor `cache_position` every slot is
        read under a mask (fixed shapes for CUDA graphs). A 2D `attention_mask` with a cache covers slots [0, L).

        The three stages are methods of their own (`embed_inputs`, `decoder_layers`, `output_logits`), so that a
        decode step of a model split over GPUs can be recorded as one CUDA graph per GPU.
        """
        h, inputs = self.embed_inputs(input_ids, attention_mask, position_ids, segment_ids, cache, cache_position)
        h, pending = self.decoder_layers(h, None, range(len(self.model.layers)), inputs)
        if cache is not None and cache_position is None:
            cache.seen += input_ids.shape[1]
        return self.output_logits(h, pending, logits_to_keep)

    def embed_inputs(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, cache=None,
                     cache_position=None) -> tuple[torch.Tensor, LayerInputs]:
        """`forward`'s first stage, its arguments checked as it documents: the embeddings (B, T, hidden) of
        input_ids (B, T) int64 and the `LayerInputs` that every decoder layer of the call reads."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            # free on the host; ids already on a GPU are left unchecked, as the check would wait for the GPU
            check_token_ids(input_ids, self.config.vocab_size)
        # decoding feeds back tokens sampled on the head's device; the embeddings may sit on another GPU
        input_ids = input_ids.to(self.model.embed_tokens.weight.device)
        device = input_ids.device
        if cache is None:
            cache_position = torch.arange(t, device=device)
            n_keys = t
            mask, is_causal = _mask_without_cache(attention_mask, segment_ids, b, t, device)
            kv_slots = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with a KV cache; pack for training, not decoding")
            dtype = self.model.embed_tokens.weight.dtype
            if (b, dtype) != (cache.batch_size, cache.dtype):
                raise ValueError(f"KV cache holds {cache.batch_size} rows of {cache.dtype}; this call has {b} rows of "
                                 f"the model's {dtype}; build the cache with model.new_cache(batch_size, max_len)")
            if attention_mask is not None:
                if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] > cache.max_len:
                    raise ValueError(f"with a cache attention_mask must be (B, L) = ({b}, at most {cache.max_len}), "
                                     f"got {tuple(attention_mask.shape)}")
                cache.set_padding(attention_mask.to(cache.key_mask.device))
            mask, is_causal, cache_position, n_keys = _mask_with_cache(cache, cache_position, t, device)
            kv_slots = list(zip(cache.k, cache.v))
        _check_sliding_window(self.config.sliding_window, n_keys)
        if position_ids is None:
            position_ids = (_segment_positions(segment_ids) if segment_ids is not None
                            else cache_position.unsqueeze(0).expand(b, t))
        elif tuple(position_ids.shape) not in ((b, t), (1, t)):
            # a (B, 1) or (1, 1) tensor would broadcast one position over every token without an error
            raise ValueError(f"position_ids must be (B, T)=({b}, {t}) or (1, {t}), got {tuple(position_ids.shape)}")
        h = self.model.embed_tokens(input_ids)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(h.dtype)  # SDPA wants an additive mask in the query's dtype
        return h, LayerInputs(position_ids, mask, is_causal, kv_slots, cache_position, n_keys)

    def decoder_layers(self, h: torch.Tensor, pending: torch.Tensor | None, indices: range,
                       inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder layers `indices` on the hidden state h + pending (each (B, T, hidden); pending None before
        the first layer) and return the pair (h', pending') that the next layer or `output_logits` takes. Activations
        and `inputs` follow each layer to its device."""
        per_device = {}
        for i in indices:
            layer = self.model.layers[i]
            dev = layer.device
            if dev not in per_device:
                cos, sin = rope_cos_sin(self._inv_freq_on(dev), inputs.position_ids.to(dev), h.dtype)
                mask = None if inputs.mask is None else inputs.mask.to(dev)
                per_device[dev] = (cos, sin, mask, inputs.cache_position.to(dev))
            cos, sin, layer_mask, slots = per_device[dev]
            h, pending = h.to(dev), None if pending is None else pending.to(dev)
            kv = None if inputs.kv_slots is None else inputs.kv_slots[i]
            args = (cos, sin, layer_mask, inputs.is_causal, kv, slots, inputs.n_keys)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                if pending is not None:  # a checkpoint keeps its inputs: one tensor per layer, not two
                    h, pending = h + pending, None
                h, pending = checkpoint(layer, h, pending, *args, use_reentrant=False)
            else:
                h, pending = layer(h, pending, *args)
        return h, pending

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """`inv_freq` on `device`: the buffer, or for the layers of a split model on another GPU a copy made once
        per buffer (a CUDA graph records one GPU's work, so a decode step must not copy it across GPUs each time)."""
        if self.inv_freq.device == device:
            return self.inv_freq
        source, copy = self._inv_freq_copies.get(device, (None, None))
        if source is not self.inv_freq:  # first use, or the buffer was replaced (model.to, the loader)
            copy = self.inv_freq.to(device)
            self._inv_freq_copies[device] = (self.inv_freq, copy)
        return copy

    def output_logits(self, h: torch.Tensor, pending: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """`forward`'s last stage: the final norm of h + pending (B, T, hidden) and the output head -> logits
        (B, T, vocab), or (B, logits_to_keep, vocab) for the last positions."""
        h, pending = h.to(self.model.norm.weight.device), pending.to(self.model.norm.weight.device)
        if logits_to_keep:
            h, pending = h[:, -logits_to_keep:], pending[:, -logits_to_keep:]
        _, normed = self.model.norm(pending, residual=h)
        return self.lm_head(normed.to(head_device(self.lm_head)))


def _check_sliding_window(window: int | None, n_keys: int) -> None:
    """Refuse attending over more than the config's `sliding_window` keys (`n_keys`: the cache slots a call reads, or
    its own tokens without a cache): past the window transformers masks the oldest keys, which this model attends."""
    if window is not None and n_keys > window:
        raise ValueError(f"{n_keys} attended tokens exceed sliding_window={window} of the config, which nf4lora does "
                         f"not apply; valid: at most {window} tokens (cache slots) per sequence")


def head_device(head: nn.Module) -> torch.device:
    """Where the output head's weight lives: a LoRA-wrapped head keeps it in its base layer."""
    return getattr(head, "base_layer", head).weight.device


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids (any shape, integer dtype) outside [0, vocab_size) in one line naming the first one: the
    embedding lookup would fail deep inside on the CPU and with a device-side assert on a GPU."""
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise token_id_error(ids[bad][0].item(), vocab_size)


def token_id_error(token_id: int, vocab_size: int) -> ValueError:
    """The one-line error for a token id outside [0, vocab_size)."""
    return ValueError(f"token id {token_id} is out of range; valid: 0 to {vocab_size - 1} (vocab_size)")


def _segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where segment_ids (B, T) changes value (and at column 0): where a packed example begins."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) restarting at 0 wherever segment_ids (B, T) changes value."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = _segment_starts(segment_ids)
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


def _mask_without_cache(attention_mask, segment_ids, b, t, device):
    """(mask, is_causal) for attention among the T new tokens only."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if segment_ids is not None:
            raise ValueError("pass either a 4D attention_mask or segment_ids, not both")
        _check_4d_mask(attention_mask, b, t)
        return attention_mask.to(device), False
    if attention_mask is None and segment_ids is None:
        return None, True
    if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"attention_mask must be (B, T)=({b}, {t}) or 4D, got {tuple(attention_mask.shape)}")
    idx = torch.arange(t, device=device)
    allowed = (idx[None, :] <= idx[:, None])[None, None]  # (1, 1, T, T): query row, key column
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device).bool()[:, None, None, :]
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids must be (B, T)=({b}, {t}), got {tuple(segment_ids.shape)}")
        # runs, not values: an id that comes back later (alternating 0/1 ids) is a new example, as in the positions
        example = _segment_starts(segment_ids).cumsum(dim=1).to(device)
        allowed = allowed & (example[:, None, :, None] == example[:, None, None, :])
    # A padded query would otherwise see no key at all and SDPA would return NaN; its own slot keeps it finite.
    return allowed | torch.eye(t, dtype=torch.bool, device=device), False


def _check_4d_mask(mask: torch.Tensor, b: int, t: int) -> None:
    """Refuse a 4D mask SDPA would misread: an integer 0/1 mask would be added to the scores, masking nothing."""
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"a 4D attention_mask must be bool (True = may attend) or additive float, got {mask.dtype}")
    if mask.shape[0] not in (1, b) or tuple(mask.shape[2:]) != (t, t):
        raise ValueError(f"a 4D attention_mask must be (B or 1, 1 or heads, T, T) with B={b}, T={t}, "
                         f"got {tuple(mask.shape)}")


def _check_cache_position(cache_position, t: int, max_len: int) -> None:
    """Refuse a cache_position that is not (T,) int64 slots in [0, max_len) in one line; the range only on the CPU,
    as reading a GPU tensor would wait for the GPU (and break a CUDA graph capture)."""
    if not isinstance(cache_position, torch.Tensor):
        raise ValueError(f"cache_position must be a ({t},) int64 tensor of cache slots, got a "
                         f"{type(cache_position).__name__}")
    if cache_position.dtype != torch.int64 or tuple(cache_position.shape) != (t,):
        raise ValueError(f"cache_position must be a ({t},) int64 tensor of cache slots, got "
                         f"{tuple(cache_position.shape)} {cache_position.dtype}")
    if cache_position.device.type == "cpu" and t and not torch.compiler.is_compiling():
        low, high = cache_position.min().item(), cache_position.max().item()
        if low < 0 or high >= max_len:
            raise ValueError(f"cache_position {low if low < 0 else high} is out of range; valid: 0 to {max_len - 1}")


def _mask_with_cache(cache: KVCache, cache_position, t: int, device):
    """(mask, is_causal, cache_position, n_keys) for T new tokens written into `cache`."""
    if cache_position is None:
        start = cache.seen
        if start + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start} used + {t} new does not fit")
        cache_position = torch.arange(start, start + t, device=device)
        n_keys = start + t
        if not cache.has_padding and start == 0:
            return None, True, cache_position, n_keys
        if not cache.has_padding and t == 1:
            return None, False, cache_position, n_keys
    else:
        _check_cache_position(cache_position, t, cache.max_len)
        n_keys = cache.max_len
    slots = torch.arange(n_keys, device=device)
    query_slots = cache_position.to(device)
    allowed = (slots[None, :] <= query_slots[:, None]) & cache.key_mask[:, None, None, :n_keys].to(device)
    return allowed | (slots[None, :] == query_slots[:, None]), False, query_slots, n_keys
