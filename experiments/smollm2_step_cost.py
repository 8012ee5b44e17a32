"""What one forward and one LoRA training step cost on SmolLM2-135M (the numbers behind the
real-model budgets in the README). Run it with nothing else busy:

    python experiments/smollm2_step_cost.py [--threads 2] [--repeats 3]

Times (median of the repeats, after one warm-up): a no-grad forward of 8 × 128 and 16 × 128
tokens, and one LoRA step (r 8 on the seven linears of every layer, as recovery=lora_smollm2:
forward + backward + AdamW) on 8 × 128 tokens of the corpus' training split.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from prunelab.data.sources import EmbeddedText
    from prunelab.models.loading import load_pretrained
    from prunelab.models.packaged import ensure

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    folder = ensure("smollm2_135m")
    model = load_pretrained(folder).eval()
    ids = EmbeddedText().token_ids(AutoTokenizer.from_pretrained(folder), "train")
    batch = {n: ids[: n * 128].view(n, 128) for n in (8, 16)}
    rows = []
    for n, x in batch.items():
        with torch.no_grad():
            s = timed(lambda x=x: model(input_ids=x), args.repeats)
        rows.append((f"forward, {n} × 128 tokens (no grad)", s, n * 128 / s))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.05)
    )
    peft_model.train()
    opt = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=5e-4)
    x = batch[8]

    def step() -> None:
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = timed(step, args.repeats)
    rows.append(("LoRA step r 8, 8 × 128 tokens (fwd + bwd + AdamW)", s, 8 * 128 / s))
    print(f"SmolLM2-135M, fp32, {args.threads} torch threads, median of {args.repeats}\n")
    print("| operation | seconds | tokens/s |\n|---|---|---|")
    for name, sec, tps in rows:
        print(f"| {name} | {sec:.2f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
