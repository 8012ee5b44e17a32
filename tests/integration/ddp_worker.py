"""One tiny LoRA recovery of the embedded model, written to ``<out>/adapter`` and
``<out>/history.json`` (by the main process): run by ``test_ddp.py`` once as one process and
once under ``accelerate launch --cpu --num_processes 2``.

python tests/integration/ddp_worker.py <out> '<json of LoraRecovery keys>'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunelab.models.embedded import asset_dir
from prunelab.recovery.lora import LoraRecovery

# 4 steps of a global batch of 8 windows of 32 tokens: 4 micro-batches of 2 per step (2 per
# process under 2 processes); dropout on, clipping on, validation every 2 steps.
SETTINGS = dict(
    data="embedded",
    format="text",
    cutoff_len=32,
    batch_size=8,
    micro_batch_size=2,
    max_steps=4,
    eval_every=2,
    val_size=6,
    max_train_examples=48,
    warmup_steps=1,
    lr=2e-3,
    dropout=0.1,
    max_grad_norm=0.5,
    checkpoint_every=0,
)


def main(out: str, overrides: str = "{}") -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))
    model = AutoModelForCausalLM.from_pretrained(asset_dir("tiny_llama"), dtype=torch.float32)
    rec = LoraRecovery(**{**SETTINGS, **json.loads(overrides)})
    train, val, _ = rec.features_for(tok)
    rec.fit_features(model, tok, train, val, Path(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
