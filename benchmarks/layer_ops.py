"""The fused decoder-layer inference kernels (RMSNorm with the residual add, RoPE + KV-cache write, SiLU * up),
with and without programmatic dependent launch (``nf4lora.kernels.pdl``), against the eager PyTorch ops they
replace, in one process on one model.

    python benchmarks/layer_ops.py [--layers 8] [--repeats 3] [--out-dir DIR]

A Llama-2-7B-shaped model with random weights (``--layers`` decoder layers, NF4 double-quantized projections,
bf16) is built on the GPU and runs in three settings, alternating ``--repeats`` times so that drift in the
host's speed hits all alike: the default inference path (fused kernels, launched as programmatic dependents on
Hopper), the fused kernels launched plainly (``pdl.enabled`` forced off), and the PyTorch ops
(``nf4lora.model.llama``'s switch forced off as well). Per setting, medians over the repeats:

- batch-1 greedy decode ms/token, eager and with each step replayed from a CUDA graph, timed through
  ``generate_stream`` from the first new token to the last (prefill and the graph's capture stay out);
- prefill tokens/s for one 2048-token prompt into a KV cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, positive_int, write_results  # noqa: E402
from benchmarks.model import stream_ms_per_token  # noqa: E402
from nf4lora.kernels import pdl  # noqa: E402
from nf4lora.model import Llama, LlamaConfig, generate, generate_stream  # noqa: E402
from nf4lora.model import llama as llama_module  # noqa: E402
from nf4lora.nf4.linear import quantize_linears  # noqa: E402

COLUMNS = ["setting", "eager_decode_ms_tok", "graph_decode_ms_tok", "prefill_tok_s", "eager_reps", "graph_reps"]


def build_model(layers: int) -> Llama:
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = quantize_linears(Llama(config).to(torch.bfloat16).eval())
    torch.cuda.empty_cache()
    return model


def decode_ms(model: Llama, prompt: torch.Tensor, graph: bool, new_tokens: int) -> float:
    return stream_ms_per_token(
        lambda k: generate_stream(model, prompt, max_new_tokens=k, eos_ids=(), cuda_graph=graph), new_tokens, 1)


def prefill_tok_s(model: Llama, tokens: int) -> float:
    """Tokens per second of one ``tokens``-long prefill into a fresh KV cache: the median of three timed runs after a
    warm-up (the fastest would report the best case, not the typical one)."""
    prompt = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.lm_head.weight.device)
    times = []
    with torch.no_grad():
        for _ in range(4):
            cache = model.new_cache(1, tokens)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(prompt, cache=cache, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return tokens / statistics.median(times[1:])  # the first is a warm-up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--prefill-tokens", type=positive_int, default=2048)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/layer_ops.py needs a CUDA GPU")
    model = build_model(args.layers)
    prompt = torch.randint(0, 32000, (1, 16), device="cuda")
    fused, dependent = llama_module._inference_kernels, pdl.enabled
    off = lambda *args: False  # noqa: E731
    # setting -> (the model's fused-kernel switch, the kernels' programmatic-dependent-launch switch)
    settings = {"fused kernels + PDL": (fused, dependent), "fused kernels": (fused, off), "PyTorch ops": (off, off)}
    reps = {name: {"eager": [], "graph": [], "prefill": []} for name in settings}
    tokens = {}
    try:
        for _ in range(args.repeats):
            for name, (kernels_switch, pdl_switch) in settings.items():
                llama_module._inference_kernels, pdl.enabled = kernels_switch, pdl_switch
                reps[name]["eager"].append(decode_ms(model, prompt, False, max(1, args.new_tokens // 2)))
                reps[name]["graph"].append(decode_ms(model, prompt, True, args.new_tokens))
                reps[name]["prefill"].append(prefill_tok_s(model, args.prefill_tokens))
                tokens[name] = generate(model, prompt, max_new_tokens=32, cuda_graph=True)
    finally:
        llama_module._inference_kernels, pdl.enabled = fused, dependent
    rows = [
        {"setting": name, "eager_decode_ms_tok": statistics.median(r["eager"]),
         "graph_decode_ms_tok": statistics.median(r["graph"]), "prefill_tok_s": statistics.median(r["prefill"]),
         "eager_reps": [round(v, 2) for v in r["eager"]], "graph_reps": [round(v, 3) for v in r["graph"]]}
        for name, r in reps.items()
    ]
    same = (tokens["fused kernels"] == tokens["PyTorch ops"]).float().mean().item()
    same_pdl = torch.equal(tokens["fused kernels + PDL"], tokens["fused kernels"])
    summary = (
        f"Llama-2-7B-shaped model, {args.layers} layers, NF4 projections, bf16, batch 1; medians of {args.repeats} "
        f"alternating repeats. Greedy tokens equal between fused kernels and PyTorch ops: {same:.3f} of 48 (16 "
        f"prompt + 32 new; the fused norm sums in another order, so a near-tie can flip); with and without "
        f"programmatic dependent launch: {'identical' if same_pdl else 'DIFFERENT'}."
    )
    write_results("layer-ops", rows, vars(args), environment(), {}, COLUMNS, summary, args.out_dir, announce=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
