"""Peak memory of LoRAPrune's structure scoring: LoRA-gradient estimates (``lora_grad``) vs
true base-weight gradients (``taylor``, the paper's memory-hungry comparison) vs ``magnitude``.

Each estimator runs in a fresh process on the same model: LoRA adapters on all seven linear
layers, ``--steps`` forward + backward passes, the scores computed after each backward (as
LoRAPrune does). Reported: the peak of the process (RSS on CPU; allocated CUDA memory on
GPU), the bytes of gradients alive at scoring time, and the model's own bytes.

    python experiments/bench_scoring_memory.py                        # tiny_llama shape, CPU
    python experiments/bench_scoring_memory.py --size 100m --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SIZES = {  # (hidden, layers, heads, intermediate, vocab)
    "embedded": (128, 8, 8, 384, 2048),
    "100m": (768, 12, 12, 2048, 32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one(estimator: str, size: str, device: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunelab.importance.lora_grad import unit_scores
    from prunelab.structure import arch_info, units

    h, n_layers, heads, inter, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
    )
    model = LlamaForCausalLM(cfg).to(device)
    arch = arch_info(model.config)
    us = units(arch, ("attn", "mlp"))
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    if estimator == "taylor":
        for n, p in pm.named_parameters():
            if "base_layer.weight" in n:
                p.requires_grad_(True)
    model_bytes = sum(p.numel() * p.element_size() for p in pm.parameters())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    grad_bytes = 0
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        pm(input_ids=ids, labels=ids).loss.backward()
        grad_bytes = sum(
            p.grad.numel() * p.grad.element_size() for p in pm.parameters() if p.grad is not None
        )
        unit_scores(pm, arch, us, estimator)
        for p in pm.parameters():
            p.grad = None
    out = {
        "estimator": estimator,
        "size": size,
        "device": device,
        "model_mb": model_bytes / 2**20,
        "grad_mb_at_scoring": grad_bytes / 2**20,
    }
    if device.startswith("cuda"):
        out["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.device, args.steps, args.batch, args.seq)))
        return
    rows = []
    for est in ("lora_grad", "taylor", "magnitude"):
        cmd = [sys.executable, __file__, "--one", est, "--size", args.size, "--device", args.device]
        cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    key = "peak_allocated_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    print(f"| estimator | model MB | gradients at scoring MB | peak MB ({key}) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['estimator']} | {r['model_mb']:.1f} | {r['grad_mb_at_scoring']:.1f} | {r[key]:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
