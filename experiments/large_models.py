"""The memory each method needs at the papers' model sizes, from prunelab's memory plan alone
(no weights, no GPU): the table behind docs/performance.md's "Large models".

    python experiments/large_models.py [--gpu-gib 80] [--dtype float16]

For LLaMA-7B, LLaMA-13B and LLaMA-2-70B (their published config.json shapes) and each method
with its paper recipe, the largest stage's estimated peak on one device (``memory.plan_memory``,
the same lines ``dry_run=true`` prints), the stage it belongs to, and how the run fits a GPU of
``--gpu-gib``: on one device, with the layer-wise engine's block offload (the model in CPU RAM),
or spread by ``model.device_map`` over several (the GPU count is the peak's weights and working
set divided by the GPU's memory, rounded up: a lower bound, since accelerate places whole
decoder blocks).
"""

from __future__ import annotations

import argparse
import math

from hydra import compose, initialize_config_dir
from transformers import LlamaConfig

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.memory import GiB, plan_memory
from prunelab.paths import conf_dir

MODELS = {
    "LLaMA-7B": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    ),
    "LLaMA-13B": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        vocab_size=32000,
    ),
    "LLaMA-2-70B": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}

# (label, overrides): each method as its paper's table runs it (recovery where the paper tunes)
METHODS = [
    ("Wanda", ["method=wanda", "data=c4", "recovery=none"]),
    ("SparseGPT", ["method=sparsegpt", "data=c4", "recovery=none"]),
    ("ADMM", ["method=admm", "data=c4", "recovery=none"]),
    ("LLM-Pruner element¹ + LoRA", ["method=llm_pruner", "method.importance=element1", "recovery=lora"]),
    ("LoRAPrune", ["method=loraprune_paper", "recovery=none"]),
    ("LoRAShear", ["method=lorashear_paper", "recovery=none"]),
    ("ATP", ["method=atp_paper", "recovery=none"]),
]
LAYERWISE = ("Wanda", "SparseGPT", "ADMM")
# methods a dispatched model (model.device_map) cannot run: none since issue 22 (LoRAShear's
# projections and merges write back into accelerate's offload store)
NOT_DISPATCHED: tuple[str, ...] = ()


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=[*overrides, "logger=none"])


def stages(overrides: list[str], config: LlamaConfig) -> dict[str, float]:
    """Each stage's estimated peak on one device, GiB."""
    return {s.name: s.peak / GiB for s in plan_memory(compose_cfg(overrides), config, "cuda")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args()
    gpu = args.gpu_gib
    print(
        f"| method | model | prune (training methods: while training) | LoRA recovery | evaluation "
        f"| how it runs on {gpu:g} GiB GPUs |"
    )
    print("|---|---|---:|---:|---:|---|")
    for label, overrides in METHODS:
        for model, config in MODELS.items():
            base = ["model=llama_7b", f"model.dtype={args.dtype}", *overrides]
            st = stages(base, config)
            prune = next(v for k, v in st.items() if k.startswith("prune"))
            recover = st.get("LoRA recovery")
            evaluate = max(v for k, v in st.items() if "evaluation" in k)
            how = []
            if prune > gpu and label in LAYERWISE:
                off = stages([*base, "method.offload=true", "method.activations=disk"], config)
                off_prune = next(v for k, v in off.items() if k.startswith("prune"))
                how.append(f"prune with `method.offload=true method.activations=disk` ({off_prune:.1f} GiB)")
            elif prune > gpu and label in NOT_DISPATCHED:
                how.append(
                    f"**not runnable**: `model.device_map` refuses {label}; one device of ≥ {prune:.0f} GiB"
                )
            elif prune > gpu:
                how.append(f"prune on `model.device_map=auto` over ≥ {math.ceil(prune / gpu)} GPUs")
            if recover and recover > gpu:
                how.append(f"recover on `model.device_map=auto` over ≥ {math.ceil(recover / gpu)} GPUs")
            if evaluate > gpu:
                how.append(f"evaluate on `model.device_map=auto` over ≥ {math.ceil(evaluate / gpu)} GPUs")
            cells = [f"{prune:.1f}", f"{recover:.1f}" if recover else "—", f"{evaluate:.1f}"]
            print(f"| {label} | {model} | " + " | ".join(cells) + f" | {'; '.join(how) or 'one GPU'} |")


if __name__ == "__main__":
    main()
