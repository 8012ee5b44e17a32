"""Synthetic models: LLaMA configs at a chosen scale with random weights, for timing and
memory measurements where a trained model of that size is not at hand (offline CI, a laptop).

    prunelab-bench --model synthetic_110m          # the benchmark's ~100M-parameter config
    prunelab model=synthetic_110m ...              # any run: fast to build, meaningless quality

``model.path: synthetic:<name>`` builds the folder on first use (seeded init, safetensors +
config.json + the embedded tokenizer, whose ids all lie inside the larger vocabulary) under
``$PRUNELAB_SYNTHETIC_DIR`` (default ``~/.cache/prunelab/synthetic``) and reuses it after.
Their perplexities are those of a random network; only costs and speeds mean anything.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PREFIX = "synthetic:"


@dataclass(frozen=True)
class SyntheticSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048


# LLaMA proportions (intermediate ≈ 8/3 · hidden, head_dim 64) at GPT-2-small scale:
# 12 × 7.08M decoder parameters + a 24.6M tied embedding = 109.5M.
SPECS = {
    "llama_110m": SyntheticSpec(768, 12, 12, 12, 2048),
    "llama_110m_gqa": SyntheticSpec(768, 12, 12, 4, 2048),
}


def root() -> Path:
    return Path(os.environ.get("PRUNELAB_SYNTHETIC_DIR", Path.home() / ".cache" / "prunelab" / "synthetic"))


def build(name: str, seed: int = 0) -> Path:
    """The model folder of ``synthetic:<name>``, made on first use (atomically: a half-written
    folder from an interrupted build is never used)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunelab.models.embedded import asset_dir

    spec = SPECS[name]
    out = root() / name
    if (out / "model.safetensors").exists():
        return out
    config = LlamaConfig(
        **{k: getattr(spec, k) for k in spec.__dataclass_fields__},
        head_dim=spec.hidden_size // spec.num_attention_heads,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # the same weights every time, the caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    from prunelab.tracking.rundir import unique_tmp

    tmp = unique_tmp(out)  # concurrent builders (processes, threads) do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(asset_dir("tiny_llama")).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: its folder is the same model
        shutil.rmtree(tmp, ignore_errors=True)
    return out
