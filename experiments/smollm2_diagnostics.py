"""Why magnitude scores fail on the real model: which groups each criterion removes, measured.

    python experiments/smollm2_diagnostics.py        # ~5 min on 2 cores; prints a markdown table

On SmolLM2-135M at 20% (block mode, LLM-Pruner's kept layers), for the MLP channels and the
KV groups separately: how much of the first-order Taylor importance |w·g| (LLM-Pruner's
element¹, 10 × 64 calibration tokens) sits in the groups that magnitude (l2), random and
Taylor itself remove, the Spearman correlation between the magnitude and Taylor scores,
and the perplexity (first 16 test windows) after pruning only that structure. Then, for
the embedded tiny_llama and SmolLM2-135M, the activation outliers of the MLP's intermediate
channels (the down_proj inputs): per layer, the largest per-channel mean |x| over the
median one, on 8 × 128 validation tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from prunelab.data.sources import EmbeddedText
from prunelab.evaluation.perplexity import perplexity
from prunelab.importance import select_masks
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.importance.random import RandomImportance
from prunelab.importance.taylor import TaylorImportance
from prunelab.models.loading import load_model
from prunelab.runner import build_calibration
from prunelab.structure import apply_masks, arch_info
from prunelab.structure.groups import units


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def activation_outliers(folder) -> list[tuple[float, int]]:
    """(max/median per-channel mean |x| of down_proj's input, layer), sorted ascending."""
    from transformers import AutoTokenizer

    from prunelab.models.loading import load_pretrained

    model, tok = load_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    x = EmbeddedText().token_ids(tok, "validation")[: 8 * 128].view(8, 128)
    stats: list[tuple[float, int]] = []

    def hook(_, inp):
        a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).mean(0)
        stats.append(((a.max() / a.median()).item(), len(stats)))

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    return sorted(stats)


def main() -> None:
    from hydra import compose, initialize_config_dir

    import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
    from prunelab.paths import conf_dir
    from prunelab.runner import validate

    torch.manual_seed(0)
    rows = []
    with TemporaryDirectory() as tmp:
        for target in ("mlp", "attn"):
            ratio = "0.2" if target == "mlp" else "0.05"  # attn: one KV group (of 3) per pruned layer
            with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
                cfg = compose(
                    "config",
                    [
                        "model=smollm2_135m",
                        "method=llm_pruner",
                        f"method.targets=[{target}]",
                        f"ratio={ratio}",
                        "ratio_tolerance=0.5",
                        f"output_root={Path(tmp)}",
                    ],
                )
            method, _, plan = validate(cfg)
            model, tok = load_model(cfg.model)
            ids = EmbeddedText().token_ids(tok, "test")
            calib = build_calibration(cfg, method, tok)
            arch = arch_info(model.config)
            todo = [u for u in units(arch, (target,)) if u.key in plan.remove]
            taylor = TaylorImportance("element1").scores(model, arch, todo, calib)
            crits = {
                "Taylor element¹": taylor,
                "magnitude (l2)": MagnitudeImportance(2).scores(model, arch, todo, calib),
                "random": RandomImportance(0).scores(model, arch, todo, calib),
            }
            total = sum(float(s.sum()) for s in taylor.values())
            corr = sum(spearman(crits["magnitude (l2)"][k], taylor[k]) for k in taylor) / len(taylor)
            for name, scores in crits.items():
                masks = select_masks(scores, plan.remove)
                removed = sum(float(taylor[k][~masks[k]].sum()) for k in masks)
                pruned = copy.deepcopy(model)
                apply_masks(pruned, masks)
                with torch.no_grad():
                    ppl = perplexity(pruned, ids, 128, batch_size=8, max_windows=16)
                rows.append((target, name, plan.achieved, removed / total, ppl, corr))
                print(rows[-1], flush=True)
            with torch.no_grad():
                dense_ppl = perplexity(model, ids, 128, batch_size=8, max_windows=16)
    print(f"\ndense perplexity (first 16 test windows): {dense_ppl:.2f}\n")
    print(
        "| pruned | criterion | ratio of all params | share of Taylor importance removed | ppl (16 windows) | Spearman(l2, Taylor) per unit, mean |"
    )
    print("|---|---|---|---|---|---|")
    for target, name, achieved, share, ppl, corr in rows:
        print(f"| {target} | {name} | {achieved:.1%} | {share:.1%} | {ppl:.1f} | {corr:+.2f} |")
    from prunelab.models.embedded import asset_dir
    from prunelab.models.packaged import ensure

    print("\n| model | MLP activation outliers, max/median channel: median layer | largest (layer) |")
    print("|---|---|---|")
    for name, folder in (("tiny_llama", asset_dir("tiny_llama")), ("smollm2_135m", ensure("smollm2_135m"))):
        st = activation_outliers(folder)
        print(f"| {name} | {st[len(st) // 2][0]:.1f} | {st[-1][0]:.1f} (layer {st[-1][1]}) |")


if __name__ == "__main__":
    main()
