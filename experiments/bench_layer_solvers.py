"""Time the per-layer solvers of the layer-wise family on one LLaMA-7B-sized linear layer
(random weights, correlated random inputs) — the cost each method pays per layer, without
a model. Runs on CPU (small default) or GPU (``--device cuda --size 7b``).

    python experiments/bench_layer_solvers.py                       # 512 x 1536, CPU
    python experiments/bench_layer_solvers.py --device cuda --size 7b

Also times a 2:4-sparse fp16 matmul through torch's semi-structured kernels against the
dense one, where the device supports them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prunelab.sparsity import solvers
from prunelab.sparsity.patterns import Pattern, parse_pattern

SIZES = {"small": (512, 1536), "7b": (4096, 11008)}  # (hidden, intermediate): up_proj is (inter, hidden)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--pattern", default="unstructured")
    args = p.parse_args()
    device = torch.device(args.device)
    hidden, inter = SIZES[args.size]
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(inter, hidden, generator=g) / hidden**0.5).to(device)  # up_proj: (out, in)
    mix = (torch.randn(hidden, hidden, generator=g) / hidden**0.5 + torch.eye(hidden)).to(device)
    scales = torch.exp(torch.randn(hidden, generator=g)).to(device)
    stats = solvers.InputStats(hidden, gram=True, device=device)
    for _ in range(0, args.tokens, 2048):
        stats.add((torch.randn(2048, hidden, generator=g).to(device) @ mix) * scales)
    pattern = parse_pattern(args.pattern)
    sparsity = pattern.sparsity or 0.5
    rows = {}
    for name, fn in solvers.SOLVERS.items():
        stats._derived.clear()  # time each solver's own factorisations
        fn(w[:256], stats, sparsity, pattern, "row")  # warm-up (kernels, allocator)
        stats._derived.clear()
        sync(device)
        t = time.perf_counter()
        new, keep, _ = fn(w, stats, sparsity, pattern, "row")
        sync(device)
        rows[name] = {
            "seconds": time.perf_counter() - t,
            "rel_error": solvers.reconstruction_error(w, new, stats),
        }
    out = {"device": str(device), "layer": [inter, hidden], "pattern": str(pattern), "solvers": rows}
    if device.type == "cuda" and pattern == Pattern(2, 4):
        from prunelab.sparsity.semi_structured import support

        ok, reason = support(device, torch.float16)
        if ok:
            from torch.sparse import to_sparse_semi_structured

            wd = (w * keep).half()
            ws = to_sparse_semi_structured(wd)
            x = torch.randn(hidden, 4096, device=device, dtype=torch.float16)
            times = {}
            for label, mat in (("dense", wd), ("semi_structured", ws)):
                for _ in range(3):
                    torch.mm(mat, x)
                sync(device)
                t = time.perf_counter()
                for _ in range(20):
                    torch.mm(mat, x)
                sync(device)
                times[label] = (time.perf_counter() - t) / 20
            out["matmul_2to4_fp16_s"] = times
        else:
            out["matmul_2to4_fp16_s"] = reason
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
