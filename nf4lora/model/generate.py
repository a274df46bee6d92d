"""`generate`: batched autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded; the padding is masked out of attention and skipped by the position
ids, so each row's greedy tokens are those it would get alone (sampled rows draw from one generator, so a row's
samples also depend on the rows batched with it, as in transformers). Rows stop at any EOS id and are then filled
with `pad_id`; decoding stops when every row has stopped or after `max_new_tokens`.

With `cuda_graph=True` (CUDA only) each single-token decode step is captured once in a CUDA graph and replayed:
the step has fixed shapes because it reads every cache slot under a mask built from the slot index tensor, which
removes the per-kernel launch cost that dominates batch-1 decode of a 4-bit model (2.74 against 29.9 ms/token
for a 7B model on an H200, benchmarks/results/2026-11-28_model_h200.md). By default (`cuda_graph=None`) that is the
path for a model on CUDA asked for GRAPH_MIN_NEW_TOKENS tokens or more. A model split over GPUs (`device_map="auto"`)
replays one graph per run of layers on one GPU (`_GraphedDecodeStep`). With EOS ids, whether every row has ended
is read once the next step is queued, so the host's per-step work overlaps the GPU's.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterator

import torch

from .llama import KVCache, Llama, check_token_ids, head_device, token_id_error


# Fixed-shape decoding rounds its cache up to a multiple of this many slots, so that calls whose prompt and
# new-token counts differ a little share one cache shape, hence one compiled graph (torch.compile with
# dynamic=False recompiles for every new shape, and gives up after its recompile limit).
STATIC_CACHE_MULTIPLE = 256
# cuda_graph=None captures a decode step for this many new tokens or more: the capture costs about three eager
# steps (two warm-up calls, one recorded), and each replayed step saves most of an eager one.
GRAPH_MIN_NEW_TOKENS = 8
# The ids that fit the int64 tensors generate builds from them: [INT64_MIN, INT64_END).
INT64_MIN, INT64_END = -(2**63), 2**63
FLOAT32 = torch.finfo(torch.float32)


def _as_batch(prompts, attention_mask, pad_id: int, pad_marks_padding: bool, vocab_size: int,
              device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T) int64, mask (B, T) bool) from a (B, T) or (T,) tensor with its optional 0/1 mask of the same
    shape (without one: padding where it holds pad_id if `pad_marks_padding`, else none), one token list, or a list
    of token lists (left-padded with pad_id). Refuses, in one line, what generate cannot continue: empty rows, rows
    ending in padding, token ids outside [0, vocab_size)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2):
            raise ValueError(f"prompts must be (batch, seq) or (seq,), got shape {tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
            raise ValueError(f"prompts must hold integer token ids, got {prompts.dtype}")
        ids = prompts.to(device, torch.long)
        if attention_mask is not None:
            mask = _padding_mask(attention_mask, device)
        else:
            mask = ids != pad_id if pad_marks_padding else torch.ones_like(ids, dtype=torch.bool)
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None] if mask.dim() == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} must equal input_ids shape {tuple(ids.shape)}")
        check_token_ids(ids[mask], vocab_size)
    else:
        if attention_mask is not None:  # it would be ignored: the lists' own lengths say where the padding goes
            raise ValueError("attention_mask goes with a tensor of prompts; token lists get theirs from their lengths")
        rows = _token_rows(prompts, vocab_size)
        width = max(map(len, rows), default=0)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
        ids, mask = ids.reshape(len(rows), width), mask.reshape(len(rows), width)  # (0, 0) for no rows
    if ids.shape[0] == 0:
        raise ValueError("prompts hold no rows; give at least one prompt")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt row(s) {empty} are empty; each needs at least one token")
    if not mask[:, -1].all():
        given = "attention_mask" if attention_mask is not None else f"prompt (pad_id={pad_id} marks padding)"
        raise ValueError(f"{given} row(s) {(~mask[:, -1]).nonzero().flatten().tolist()} end in padding; "
                         f"generate continues each row from its last column, so pad on the left")
    return ids, mask


def _padding_mask(attention_mask, device) -> torch.Tensor:
    """attention_mask as bool on `device`, refusing what is not a tensor of 0s and 1s."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor of 0/1 (1 = token, 0 = padding), got "
                         f"{type(attention_mask).__name__}")
    other = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
    if other.numel():
        raise ValueError(f"attention_mask must hold only 0 and 1 (1 = token, 0 = padding), got {other[0].item()}")
    return attention_mask.to(device).bool()


def _as_int(value) -> int | None:
    """value as a Python int where it is one integer (an int, a numpy integer, a 0-d integer tensor), else None:
    floats, bools, strings and sequences are not token ids."""
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0 or getattr(value, "dtype", None) == torch.bool:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _token_rows(prompts, vocab_size: int) -> list[list[int]]:
    """A list of token lists as Python ints in [0, vocab_size); one flat token list is one prompt."""
    if isinstance(prompts, (list, tuple)) and prompts and all(_as_int(i) is not None for i in prompts):
        prompts = [prompts]
    try:
        rows = [[_as_int(i) for i in row] for row in prompts]
    except TypeError:  # prompts, or one of its rows, is not iterable
        rows = None
    if rows is None or any(None in row for row in rows):
        raise ValueError(f"prompts must be token ids (encode text first): a list of int lists or a tensor, got "
                         f"{str(prompts)[:80]}")
    bad = next((i for row in rows for i in row if not 0 <= i < vocab_size), None)
    if bad is not None:  # before torch.tensor, which cannot hold an id beyond int64
        raise token_id_error(bad, vocab_size)
    return rows


def _eos_tuple(eos_ids) -> tuple[int, ...]:
    """eos_ids (an int, or ints in an iterable or an integer tensor) as a tuple of Python ints in int64's range."""
    single = _as_int(eos_ids)
    try:
        values = [single] if single is not None else [
            _as_int(i) for i in (eos_ids.reshape(-1) if isinstance(eos_ids, torch.Tensor) else eos_ids)]
    except TypeError:  # neither an int nor iterable
        values = None
    if values is None or not all(v is not None and INT64_MIN <= v < INT64_END for v in values):
        raise ValueError(f"eos_ids={eos_ids!r} are not token ids; valid: an int, ints in a list, tuple, set or "
                         f"integer tensor (each in [-2**63, 2**63)), or None")
    return tuple(values)


def _pad_id_or_none(pad_id) -> int | None:
    """pad_id as a Python int (or None), refusing what is not an int that fits the int64 output."""
    if pad_id is None:
        return None
    value = _as_int(pad_id)
    if value is None or not INT64_MIN <= value < INT64_END:
        raise ValueError(f"pad_id={pad_id!r} is not a token id; valid: an int in [-2**63, 2**63) or None")
    return value


def _is_int(x) -> bool:
    """Whether x is an integer that is not a bool (which Python counts as one)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    """Whether x is a real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_decoding(arguments: dict, as_flags: bool = False) -> None:
    """Raise one ValueError line when one of `arguments` ({name: value}, names among max_new_tokens, temperature,
    top_k, top_p and seed) breaks its rule: naming every given argument (`need ...; got max_new_tokens=0, ...`), or
    with `as_flags` the first bad one as the flag that set it (`--top-k -3 must be >= 0 (0 = no top-k cut)`)."""
    unset = "" if as_flags else " or None"  # a flag has no None: --top-k 0 and --top-p 1 cut nothing
    # name -> (test, what it must be); each test is written so that NaN, which fails every comparison, fails it
    rules = {
        "max_new_tokens": (lambda v: _is_int(v) and v >= 1, ">= 1 (an int)"),
        "temperature": (lambda v: _is_real(v) and 0 <= v < float("inf"), "a finite number >= 0 (0 = greedy)"),
        "top_k": (lambda v: v is None or _is_int(v) and v >= (0 if as_flags else 1),
                  ">= 0 (0 = no top-k cut)" if as_flags else ">= 1 (an int) or None"),
        "top_p": (lambda v: v is None or _is_real(v) and 0 < v <= 1, f"in (0, 1]{unset}"),
        "seed": (lambda v: v is None or _is_int(v) and -(2**63) <= v < 2**64, f"an int in [-2**63, 2**64){unset}"),
    }
    bad = [(name, value, rules[name][1]) for name, value in arguments.items() if not rules[name][0](value)]
    if not bad:
        return
    if as_flags:
        name, value, must = bad[0]
        raise ValueError(f"--{name.replace('_', '-')} {value} must be {must}")
    raise ValueError(f"need {', '.join(f'{name} {rules[name][1]}' for name in arguments)}; got "
                     f"{', '.join(f'{name}={value!r}' for name, value in arguments.items())}")


def check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, seed=None,
                             as_flags: bool = False) -> None:
    """The one set of rules for the decoding arguments of `generate` and of the `nf4lora generate` command:
    max_new_tokens an int >= 1; temperature a finite number >= 0 (0 = greedy); top_k an int >= 1, None for no cut;
    top_p a number in (0, 1], None for no cut; seed an int that torch's generators take ([-2**63, 2**64)), or None.
    NaN fails every rule.

    Raises one ValueError line: naming every argument (`need ...; got max_new_tokens=0, ...`), or with `as_flags`
    the first bad one as the flag that set it (`--top-k -3 must be >= 0 (0 = no top-k cut)`), where top_k 0 is the
    flag's spelling of no cut.
    """
    _check_decoding(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed), as_flags)


def _check_scores(scores, name: str) -> None:
    """Refuse, in one line, what is not a (batch, vocab) float tensor with vocab >= 1."""
    if not (isinstance(scores, torch.Tensor) and scores.dim() == 2 and scores.dtype.is_floating_point
            and scores.shape[1] >= 1):
        is_tensor = isinstance(scores, torch.Tensor)
        got = f"shape {tuple(scores.shape)} {scores.dtype}" if is_tensor else type(scores).__name__
        raise ValueError(f"{name} must be a (batch, vocab) float tensor with vocab >= 1, got {got}")


def filter_logits(scores: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """scores (B, vocab) float with tokens outside the top-k and outside the top-p nucleus set to -inf.

    Same rules as transformers' TopK/TopP warpers: ties at the k-th value are kept, and the nucleus keeps the
    smallest set of most likely tokens whose probability reaches `top_p` (at least one token). top_k an int >= 1
    and top_p in (0, 1], each None for no cut, as `check_sampling_arguments` says; anything else is refused.
    """
    _check_scores(scores, "scores")
    _check_decoding(dict(top_k=top_k, top_p=top_p))
    return _filter_logits(scores, top_k, top_p)


def _filter_logits(scores: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """``filter_logits`` on arguments already checked."""
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - float(top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return scores


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (B,) int64 from logits (B, vocab) float: argmax when temperature == 0, else sampled after
    temperature scaling, then top-k, then top-p filtering (transformers' order). The arguments follow
    `check_sampling_arguments`; anything else is refused."""
    _check_scores(logits, "logits")
    _check_decoding(dict(temperature=temperature, top_k=top_k, top_p=top_p))
    return _sample_next(logits, temperature, top_k, top_p, generator)


def _sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``sample_next`` on arguments already checked: by it, or by ``check_sampling_arguments`` once per ``generate``
    call, so that a decode step's sampling pays no argument checks."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float()
    # Shifted so that the best score is 0 (softmax and both filters are blind to a shift): a tiny temperature then
    # sends the others to -inf, where it overflowed the best one to inf and softmax gave NaN. The temperature is
    # held to float32's normal range, which already gives both limits: below it, it rounded to 0 (0 / 0 = NaN for
    # the best score); above it, to inf (-inf / inf = NaN for a filtered-out one).
    temperature = float(min(max(temperature, FLOAT32.tiny), FLOAT32.max))
    scores = _filter_logits((scores - scores.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _device_runs(model: Llama) -> list[tuple[torch.device, list[tuple]]]:
    """A decode step's stages in order, grouped into runs on one device: ("embed",) (the embeddings and the layers'
    inputs), ("layers", range) and ("output",) (the final norm and the head)."""
    stages = [(model.model.embed_tokens.weight.device, ("embed",))]
    stages += [(layer.device, ("layers", range(i, i + 1))) for i, layer in enumerate(model.model.layers)]
    stages.append((model.model.norm.weight.device, ("output",)))
    runs = []
    for device, stage in stages:
        if not runs or runs[-1][0] != device:
            runs.append((device, [stage]))
        elif stage[0] == "layers" and runs[-1][1][-1][0] == "layers":  # consecutive layers: one range
            runs[-1][1][-1] = ("layers", range(runs[-1][1][-1][1].start, stage[1].stop))
        else:
            runs[-1][1].append(stage)
    return runs


def _graphs_supported(model: Llama) -> bool:
    """Whether `_GraphedDecodeStep` takes this model: every parameter on a GPU, the final norm with the head (a graph
    records one device's work, and the output stage is not cut)."""
    return (all(p.device.type == "cuda" for p in model.parameters())
            and head_device(model.lm_head) == model.model.norm.weight.device)


class _GraphedDecodeStep:
    """One decode step replayed from CUDA graphs: (token (B, 1), position (B, 1), slot (1,)) -> logits (B, 1, vocab).

    A model on one GPU is one graph of its whole forward (compiled or not). A graph records one device's work, so the
    step of a model split over GPUs is cut where the hidden state changes GPU (`_device_runs`): one graph per run,
    replayed in order, with the hidden state and the layers' inputs (positions, mask, slot: a few KiB) copied to the
    next GPU in between. The kernels are those of the fixed-shape eager step, so the tokens are too.
    """

    def __init__(self, model, runs: list[tuple[torch.device, list[tuple]]], cache: KVCache, batch: int,
                 device: torch.device):
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Warm-up writes land in the last slot, which the real final step overwrites before anyone reads it.
        self.slot = torch.full((1,), cache.max_len - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # autotuning and lazy init happen here, outside the capture
                model(self.ids, position_ids=self.pos, cache=cache, cache_position=self.slot)
        torch.cuda.current_stream(device).wait_stream(side)
        self.segments = []  # (graph, [(static input on the run's GPU, the previous run's output)])
        state = None
        for run_device, stages in runs:
            copies = []
            if state is not None:
                state, copies = _moved_state(state, run_device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(run_device), torch.cuda.graph(graph, stream=torch.cuda.Stream(run_device)):
                if len(runs) == 1:  # the whole forward: a compiled model is called as such
                    state = model(self.ids, position_ids=self.pos, cache=cache, cache_position=self.slot)
                else:
                    state = self._run(model, cache, stages, state)
            self.segments.append((graph, copies))
        self.logits = state

    def _run(self, model, cache: KVCache, stages: list[tuple], state):
        """Run `stages` from state (h, pending, LayerInputs), or None before the embeddings; return the next state,
        or the logits after the output stage."""
        for stage in stages:
            if stage[0] == "embed":
                h, inputs = model.embed_inputs(self.ids, position_ids=self.pos, cache=cache, cache_position=self.slot)
                state = (h, None, inputs)
            elif stage[0] == "layers":
                h, pending, inputs = state
                state = (*model.decoder_layers(h, pending, stage[1], inputs), inputs)
            else:
                return model.output_logits(*state[:2])
        return state

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.slot.fill_(slot)
        for graph, copies in self.segments:
            for static, produced in copies:  # torch orders a copy between GPUs after both sides' queued work
                static.copy_(produced)
            graph.replay()
        return self.logits


def _moved_state(state, device: torch.device):
    """Static copies on `device` of a run's output state (h, pending, LayerInputs) -> (the state the next run reads,
    [(static copy, output)] to refresh before each replay). The caches stay where their layers are."""
    h, pending, inputs = state
    produced = (h, pending, inputs.position_ids, inputs.mask, inputs.cache_position)
    static = [None if t is None else torch.empty_like(t, device=device) for t in produced]
    copies = [(s, t) for s, t in zip(static, produced) if t is not None]
    h, pending, position_ids, mask, cache_position = static
    return (h, pending, inputs._replace(position_ids=position_ids, mask=mask, cache_position=cache_position)), copies


def generate(model: Llama, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_ids=None, pad_id: int | None = None, seed: int | None = None,
             attention_mask: torch.Tensor | None = None, static_cache: bool = False, cuda_graph: bool | None = None,
             compile: bool = False) -> torch.Tensor:
    """Continue `prompts` and return (B, T + n) int64: the (left-padded) prompts followed by n <= max_new_tokens
    new tokens per row, `pad_id` after a row's EOS.

    prompts: (B, T) int64 tensor (left-padded, with `attention_mask` (B, T) 0/1; without one, as in transformers,
    the tokens equal to a pad_id that is set (argument or config) and is no EOS id are padding), a list of token-id
    lists, or one token-id list or (T,) tensor (with a (T,) mask) for a single prompt.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p, reproducible with `seed`.
    eos_ids: an int or ids that end a row (default: the config's eos_token_id). pad_id defaults to the config's
    pad_token_id, else the first EOS id, else 0.
    static_cache: decode with fixed-shape steps that read every cache slot under a mask (instead of the filled
    prefix); implied by cuda_graph (replay each decode step from a CUDA graph) and by compile (run decode steps
    through `torch.compile`, which fuses the small elementwise kernels; compiled once per model and batch shape).
    cuda_graph=None (the default) turns graphs on for a model whose parameters all sit on CUDA devices and
    max_new_tokens >= GRAPH_MIN_NEW_TOKENS (on several GPUs: one graph per GPU's run of layers, without compile);
    pass False for eager steps.
    """
    ids, steps = _start(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, seed,
                        attention_mask, static_cache, cuda_graph, compile)
    # new tokens come from the head's device, which differs from the embeddings' on a model split over GPUs
    return torch.cat([ids, *(tokens[:, None].to(ids.device) for tokens in steps)], dim=1)


def generate_stream(model: Llama, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_ids=None, pad_id: int | None = None,
                    seed: int | None = None, attention_mask: torch.Tensor | None = None, static_cache: bool = False,
                    cuda_graph: bool | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """`generate`'s new tokens as they come: yields one (B,) int64 tensor per step (`pad_id` for rows already
    ended), the prompt and arguments read as `generate` reads them. Arguments are checked, and the prompt is
    prefilled, before the first token is asked for."""
    return _start(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, seed, attention_mask,
                  static_cache, cuda_graph, compile)[1]


@torch.no_grad()
def _start(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, seed, attention_mask,
           static_cache, cuda_graph, compile) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Check the arguments, prefill the prompts; return (ids (B, T) left-padded, the decode steps' iterator)."""
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, seed)
    for name, flag, valid in (("static_cache", static_cache, "True or False"), ("compile", compile, "True or False"),
                              ("cuda_graph", cuda_graph, "True, False or None (automatic)")):
        if not (isinstance(flag, bool) or name == "cuda_graph" and flag is None):  # "no" would read as True
            raise ValueError(f"{name}={flag!r} is not a flag; valid: {valid}")
    config = model.config
    eos = config.eos_token_ids if eos_ids is None else _eos_tuple(eos_ids)
    pad_id = _pad_id_or_none(pad_id)
    given_pad = pad_id if pad_id is not None else config.pad_token_id
    pad_id = given_pad if given_pad is not None else (eos[0] if eos else 0)
    # as transformers' generate infers a missing mask: from a pad id that was set and does not also end rows
    pad_marks_padding = given_pad is not None and given_pad not in eos
    device = model.model.embed_tokens.weight.device
    ids, mask = _as_batch(prompts, attention_mask, pad_id, pad_marks_padding, config.vocab_size, device)
    b, t = ids.shape
    runs = _device_runs(model)
    graphable = _graphs_supported(model) and (len(runs) == 1 or not compile)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and max_new_tokens >= GRAPH_MIN_NEW_TOKENS and graphable
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on CUDA, it is on {device}")
    if cuda_graph and not graphable:
        raise ValueError("cuda_graph=True on a model split over devices needs every parameter on a GPU, the final "
                         "norm and lm_head on one, and compile=False; valid: cuda_graph=False or None (automatic)")
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache_len = t + max_new_tokens
    window = config.sliding_window
    if window is not None and cache_len > window:  # refused before any token, not by the forward midway
        raise ValueError(f"{t} prompt tokens + max_new_tokens={max_new_tokens} exceed the config's sliding_window="
                         f"{window}, which nf4lora does not apply; valid: at most {window} tokens in all")
    if static_cache or cuda_graph or compile:  # fixed-shape steps read every slot anyway
        cache_len = -(-cache_len // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
        cache_len = cache_len if window is None else min(cache_len, window)  # no slot past the window
    cache = model.new_cache(b, cache_len)
    padded = not bool(mask.all())
    # padding slots are masked out, so any id serves there; 0 is one the embedding has, unlike pad_id perhaps
    logits = model(ids.masked_fill(~mask, 0), attention_mask=mask if padded else None, position_ids=positions,
                   cache=cache, logits_to_keep=1)
    if compile:
        model = torch.compile(model, dynamic=False)
    step = _GraphedDecodeStep(model, runs, cache, b, device) if cuda_graph else None
    static = static_cache or compile
    # sampled where the logits are: the head's device
    generator = None if seed is None else torch.Generator(device=logits.device).manual_seed(int(seed))
    sampling = (temperature, top_k, top_p, generator)
    return ids, _steps(model, cache, step, static, logits, positions[:, -1:], t, max_new_tokens, sampling, eos, pad_id)


@torch.no_grad()
def _steps(model, cache: KVCache, step, static: bool, logits: torch.Tensor, pos: torch.Tensor, t: int,
           max_new_tokens: int, sampling: tuple, eos: tuple, pad_id: int) -> Iterator[torch.Tensor]:
    """Sample from `logits` (B, 1, vocab), yield the (B,) tokens, decode them at slot t + i; repeat."""
    device = logits.device
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        sampled = _sample_next(logits[:, -1], *sampling)
        yield torch.where(finished, torch.full_like(sampled, pad_id), sampled)
        finished |= torch.isin(sampled, eos_tensor)
        if i == max_new_tokens - 1:
            return
        all_finished = finished.all() if eos else None  # no EOS ids: no host sync at all
        pos = pos + 1
        # Finished rows keep decoding their own (valid) samples: pad_id need not be a vocabulary id.
        if step is not None:
            logits = step(sampled[:, None], pos, t + i)
        elif static:
            slot = torch.full((1,), t + i, dtype=torch.long, device=device)
            logits = model(sampled[:, None], position_ids=pos, cache=cache, cache_position=slot)
        else:
            logits = model(sampled[:, None], position_ids=pos, cache=cache)
        # Read after the next step is queued: the host waits for this step's sampling only, while the GPU already
        # has the next forward, so host and GPU overlap (a last, unused forward is the price once all rows end).
        if all_finished is not None and bool(all_finished):
            return
