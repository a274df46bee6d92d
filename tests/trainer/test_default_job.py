import json

import pytest
import torch

from nf4lora.trainer.cli import main
from nf4lora.trainer.metrics import read_metrics


def test_default_command_trains_saves_and_peft_loads_the_adapter(tmp_path, capsys):
    """`python train.py` with only the run length shortened: generated model and data, NF4, LoRA, sample."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from nf4lora.lora import load_adapter
    from nf4lora.model import load_model

    run = tmp_path / "run"
    assert main(["train", "--max-steps", "4", "--warmup-steps", "0", "--micro-batch", "4", "--val-fraction", "0.01",
                 "--output-dir", str(run), "--no-progress", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "sample completion:" in out and str(run) in out
    base = run / "base_model"
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (base / name).is_file()
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "checkpoint-4/trainer_state.pt"):
        assert (run / name).is_file()
    curve = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(curve) == 4 and curve[-1] < curve[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["eval_loss"] > 0 and summary["sample"]["reference"]

    hf = transformers.LlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, str(run)).eval()
    ours = load_adapter(load_model(str(base), dtype=torch.float32), str(run)).eval()
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Same fp32 weights and math in both; only the order of floating-point sums differs.
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
