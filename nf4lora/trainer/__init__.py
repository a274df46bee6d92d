"""The QLoRA trainer and the ``nf4lora`` command line (``python train.py`` runs ``nf4lora train``).

- ``config``: ``TrainConfig`` (typed, validated) <-> kebab-case flags <-> ``--config file.toml``;
- ``corpus``: the bundled generated legal-clause dataset and the sentencepiece tokenizer fitted on it;
- ``data``: reading .jsonl/.json/.txt/.csv/.parquet, record formats, prompt masking, packing, deterministic batches;
- ``checkpoint``: atomic checkpoints (adapter, optimizer, scheduler, RNG, data position) and resume checks;
- ``loop``: the optimization loop (accumulation, clipping, schedule, eval, Ctrl-C, CUDA OOM retry);
- ``metrics``: metrics.jsonl, progress bar, loss-curve PNG;
- ``job``: the whole ``train`` workflow; ``commands``: ``generate``, ``merge``, ``quantize``, ``inspect``;
- ``cli``: argument parsing and one-line errors with exit code 2.
"""
