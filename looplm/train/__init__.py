"""Training looped models: the LoopLM objectives, data, the trainer and checkpoint writing.

- `objective`: Stage I / Stage II losses as pure tensor functions (spec section 8).
- `data`: corpus and tokenizer building, the arithmetic task, deterministic token batches.
- `trainer`: `TrainConfig` + `train()` (AdamW, warmup + cosine, bf16 autocast, DDP, resume).
- `saving`: HF-layout checkpoints that `looplm.load` reads.
"""
