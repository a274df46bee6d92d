"""End-to-end QLoRA training throughput: nf4lora's trainer vs transformers + bitsandbytes + peft + PagedAdamW32bit.

    PYTHONPATH=.bnb:. python benchmarks/train.py [--out DIR] [--steps 8] [--tiny]

Model: a Llama-2-7B-shaped decoder (32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000) with
random weights, identical in both systems: every tensor is drawn from a generator seeded by its Hugging Face name,
so no checkpoint has to be written to disk. Linear weights are NF4 with double quantization (blocksize 64), compute
in bf16, gradient checkpointing on, micro-batch 4 x 512 tokens, LoRA dropout 0.05, max grad norm 0.3, lr 2e-4.
Cases: the seed's LoRA (r=16, alpha=32 on q/k/v/o) and QLoRA's all-linear r=64 (alpha=16).

- ours: ``nf4lora.trainer`` (``prepare_for_kbit_training``, ``inject_lora``, ``PagedAdamW``, ``Trainer.train_step``);
- peer: the classic recipe: bitsandbytes ``Linear4bit`` holding the same NF4 bytes,
  ``peft.prepare_model_for_kbit_training``, ``get_peft_model``, ``bitsandbytes.optim.PagedAdamW32bit``.

Correctness before timing: both base models give the same logits on one 128-token sequence, within bf16
tolerance (the run exits 1 otherwise). Reported per case: tokens/s over ``--steps`` timed steps after
two warm-up steps, and peak GPU memory (``max_memory_allocated`` from LoRA injection to the last step: the 4-bit
model, adapter, optimizer and activations; the dense weights used to build the model are freed before; for the peer
plus the optimizer states bitsandbytes pages in CUDA managed memory, which the allocator does not count). Results go
to ``<date>_train_<gpu>.{json,md}`` in ``--out`` (default benchmarks/results). ``--tiny`` runs a 2-layer model on
whatever device is there (a smoke test of the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    device_ceilings, environment, markdown_table, positive_int, write_results,
)

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
CASES = {
    "r16_qkvo": dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r64_all_linear": dict(r=64, alpha=16, targets="all-linear"),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MICRO_BATCH, SEQ_LEN, LR, DROPOUT, MAX_GRAD_NORM = 4, 512, 2e-4, 0.05, 0.3
# The baseline, one H200: transformers + bitsandbytes + peft + PagedAdamW32bit.
BASELINE_TOKENS_PER_S = {"r16_qkvo": 5316, "r64_all_linear": 3787}
# Both systems run bf16 matmuls on the same NF4 bytes; bf16 has 8 bits of mantissa and the sums differ in order,
# and the difference grows with depth: 7.6e-3 with 2 layers (CPU) and 2.2e-2 with 32 (H200, 2026-11-28, when this
# bound was 2e-2). A wrong layer gives errors of order 1, so 5e-2 still catches one.
CHECK_TOL = 5e-2
COLUMNS = ("case", "system", "tokens_per_s", "step_ms", "peak_gib", "first_loss", "last_loss", "vs_baseline_5316_3787",
           "ours/peer")


def weight_for(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The benchmark's weight for a Hugging Face tensor name: N(0, 0.02) (norms: ones), bf16, seeded by name."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator, device=device) * 0.02).to(torch.bfloat16)


def fill_weights(model: nn.Module, device: torch.device) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weight_for(name, tuple(param.shape), device))


def batches(vocab: int, count: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (MICRO_BATCH, SEQ_LEN), generator=generator).to(device) for _ in range(count)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    return float((out - ref).abs().max() / ref.abs().max())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s states in CUDA managed memory: bitsandbytes' paged optimizers keep the states of
    tensors of 1e5 elements and more there (``is_paged``), where torch's allocator does not count them."""
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False))


def peak_gib(device: torch.device, unseen_bytes: int = 0) -> float | None:
    """Peak GPU memory since the last reset, GiB: the allocator's peak plus ``unseen_bytes`` held outside it."""
    return (torch.cuda.max_memory_allocated(device) + unseen_bytes) / 2**30 if device.type == "cuda" else None


def replace_linears(model: nn.Module, make) -> None:
    """Swap every nn.Linear but the output head for `make(linear)`, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


# ----------------------------------------------------------------------------------------------------------- ours

def build_ours(arch: dict, device: torch.device) -> nn.Module:
    """Our Llama with NF4 (double-quantized) linears quantized on the device from the seeded bf16 weights."""
    from nf4lora.model import Llama, LlamaConfig
    from nf4lora.model.rope import rope_inv_freq
    from nf4lora.nf4.linear import NF4Linear

    with torch.device(device):
        model = Llama(LlamaConfig(**arch)).to(torch.bfloat16)
    model.inv_freq = rope_inv_freq(model.config, device=device)  # fp32 on the device, as load_model leaves it
    fill_weights(model, device)
    replace_linears(model, lambda module: NF4Linear.from_linear(module, compute_dtype=torch.bfloat16))
    return model.eval()


def ours_trainer(model: nn.Module, spec: dict, steps: int, rows: list, device: torch.device):
    """Inject case ``spec``'s LoRA into ``model`` and return the ``Trainer`` for ``steps`` optimizer steps on ``rows``."""
    from nf4lora.lora import inject_lora
    from nf4lora.trainer.config import TrainConfig
    from nf4lora.trainer.data import BatchPlan
    from nf4lora.trainer.job import lora_config, make_optimizer
    from nf4lora.trainer.loop import LoopState, Trainer

    targets = spec["targets"] if isinstance(spec["targets"], str) else ",".join(spec["targets"])
    config = TrainConfig(model="random", lora_r=spec["r"], lora_alpha=spec["alpha"], target_modules=targets,
                         lora_dropout=DROPOUT, micro_batch=MICRO_BATCH, max_len=SEQ_LEN, lr=LR,
                         max_grad_norm=MAX_GRAD_NORM, dtype="bf16", progress=False, max_steps=steps)
    inject_lora(model, lora_config(config))
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    plan = BatchPlan(rows, MICRO_BATCH, seed=0, pad_id=0, packed=False)
    return Trainer(config, model, optimizer, scheduler, plan, steps, Path("unused"), device,
                   save_adapter=lambda d: None, state=LoopState())


def training_rows(arch: dict, steps: int) -> list:
    """Enough random full-length examples for ``steps`` optimizer steps of ``MICRO_BATCH`` sequences."""
    from nf4lora.trainer.data import Example

    return [Example(ids.tolist(), [-100] + ids[1:].tolist()) for b in batches(arch["vocab_size"], steps, "cpu")
            for ids in b]


def run_ours(arch: dict, steps: int, device: torch.device,
             reference_ids: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    from nf4lora.lora import delete_adapter
    from nf4lora.trainer.job import prepare_for_kbit_training

    reset_memory(device)
    model = build_ours(arch, device)
    with torch.no_grad():
        logits = model(reference_ids).float().cpu()
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    rows = training_rows(arch, steps + 2)
    results = []
    for case, spec in CASES.items():
        reset_memory(device)
        trainer = ours_trainer(model, spec, steps + 2, rows, device)
        records = [trainer.train_step() for _ in range(2)]
        sync(device)
        start = time.perf_counter()
        records += [trainer.train_step() for _ in range(steps)]
        sync(device)
        seconds = time.perf_counter() - start
        results.append(row(case, "nf4lora", steps, seconds, peak_gib(device), records[0]["loss"], records[-1]["loss"]))
        del trainer
        delete_adapter(model, "default")
    del model
    reset_memory(device)
    return results, logits


# ----------------------------------------------------------------------------------------------------------- peer

def build_peer(arch: dict, device: torch.device) -> nn.Module:
    """transformers' Llama with bitsandbytes NF4 linears holding the same 4-bit bytes as ours."""
    import bitsandbytes as bnb
    import transformers

    from nf4lora.kernels import quantize as nf4_quantize
    from nf4lora.nf4.state_dict import to_bnb_state_dict

    config = transformers.LlamaConfig(**arch, tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    fill_weights(model, device)
    def to_linear4bit(module: nn.Linear) -> nn.Module:
        # Same 4-bit bytes as ours: quantized by nf4lora (bitsandbytes' CPU format) and handed over as a
        # prequantized state. bitsandbytes' own CUDA double quantization rounds some absmax codes differently
        # (nf4/blockwise.py), which would make the two base models differ by more than their kernels do.
        state = to_bnb_state_dict(nf4_quantize(module.weight.detach(), 64, "nf4", True), "weight")
        q4 = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, device="meta",
                               compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        q4.weight = bnb.nn.Params4bit.from_prequantized(
            data=state["weight"], requires_grad=False, device=device,
            quantized_stats={key.removeprefix("weight."): value for key, value in state.items() if key != "weight"},
        )
        return q4

    replace_linears(model, to_linear4bit)
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft checks it
    return model.eval()


def run_peer(arch: dict, steps: int, device: torch.device,
             reference_ids: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    reset_memory(device)
    model = build_peer(arch, device)
    with torch.no_grad():
        logits = model(input_ids=reference_ids).logits.float().cpu()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    data = batches(arch["vocab_size"], steps + 2, device)
    results = []
    for case, spec in CASES.items():
        reset_memory(device)
        targets = ALL_LINEAR if spec["targets"] == "all-linear" else spec["targets"]
        peft_model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=targets,
                                                      lora_dropout=DROPOUT, bias="none", task_type="CAUSAL_LM"))
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
        losses = []

        def step(ids: torch.Tensor) -> None:
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        for ids in data[:2]:
            step(ids)
        sync(device)
        start = time.perf_counter()
        for ids in data[2:]:
            step(ids)
        sync(device)
        seconds = time.perf_counter() - start
        # its paged states sit on the GPU (they fit) but in managed memory: without them the r=64 peak was 1.19 GiB
        # (160M parameters x 8 bytes) short of ours, which holds the same states in the allocator
        peak = peak_gib(device, paged_state_bytes(optimizer))
        results.append(row(case, "transformers+bnb+peft", steps, seconds, peak, losses[0], losses[-1]))
        del optimizer, params
        model = peft_model.unload()
        del peft_model
    del model
    reset_memory(device)
    return results, logits


def row(case: str, system: str, steps: int, seconds: float, peak: float | None, first: float, last: float) -> dict:
    tokens_per_s = steps * MICRO_BATCH * SEQ_LEN / seconds
    return {"case": case, "system": system, "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
            "peak_gib": peak, "first_loss": first, "last_loss": last,
            "vs_baseline_5316_3787": tokens_per_s / BASELINE_TOKENS_PER_S[case]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results)")
    parser.add_argument("--steps", type=positive_int, default=8,
                        help="timed optimizer steps per case (after 2 warm-up)")
    parser.add_argument("--tiny", action="store_true", help="2-layer smoke test on any device")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers + bitsandbytes + peft")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("the 7B benchmark needs a CUDA GPU; use --tiny for a smoke test on the CPU")
    arch = TINY if args.tiny else LLAMA2_7B
    reference_ids = torch.randint(3, arch["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(7))
    env = environment(extra_packages=("bitsandbytes", "peft", "transformers"))
    ceilings = device_ceilings() if device.type == "cuda" else {}
    begin = time.perf_counter()
    rows, ours_logits = run_ours(arch, args.steps, device, reference_ids.to(device))
    summary: dict = {"ours_seconds": round(time.perf_counter() - begin, 1)}
    if not args.no_peer:
        begin = time.perf_counter()
        peer_rows, peer_logits = run_peer(arch, args.steps, device, reference_ids.to(device))
        summary["peer_seconds"] = round(time.perf_counter() - begin, 1)
        summary["base_logits_rel_err"] = rel_err(ours_logits, peer_logits)
        for ours, peer in zip(rows, peer_rows):
            ours["ours/peer"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        rows += peer_rows
        summary["checks_ok"] = summary["base_logits_rel_err"] <= CHECK_TOL
    rows.sort(key=lambda r: (r["case"], r["system"]))
    print(markdown_table(rows, COLUMNS), flush=True)
    config = {"arch": arch, "cases": CASES, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN, "lr": LR,
              "lora_dropout": DROPOUT, "max_grad_norm": MAX_GRAD_NORM, "steps": args.steps, "warmup_steps": 2,
              "quantization": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16",
              "gradient_checkpointing": True, "optimizer": "PagedAdamW 32-bit", "tiny": args.tiny}
    text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    json_path, md_path = write_results("train", rows, config, env, ceilings, COLUMNS, summary=text, out_dir=args.out)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    print(json.dumps({"summary": summary, "rows": rows}))
    return 0 if summary.get("checks_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
