"""Mutation testing of the algorithm modules (issue 18.6): a curated list of one-line formula
changes — each a plausible slip in a paper's equation — and the targeted tests that must
catch it. Every mutant is applied alone to a *copy* of the working tree (``src/`` and
``tests/``, ``conf/`` in a temporary folder, imported through PYTHONPATH), the listed test files run
with ``-x -q`` and OMP_NUM_THREADS=1, and the mutant counts as killed when they fail. The
working tree itself is never written.

    python experiments/mutants.py                     # all modules (~11 min on 2 cores)
    python experiments/mutants.py --module ATP        # one module
    python experiments/mutants.py --check             # every snippet still matches, no tests
    python experiments/mutants.py --json mutants.json # results as JSON too
    python experiments/mutants.py --only "most salient" --tests tests/unit/test_lorashear.py
                                                      # which tests kill a given mutant

Modules: importance (Taylor, magnitude, aggregation, selection), sparsity solvers (magnitude,
Wanda, SparseGPT, ADMM), LHSPG/knowledge/mixer (LoRAShear), ATP generator and pruner,
LoRAPrune (the LoRA-gradient estimate and the pruning schedule), and the checkpoint export
(issue 20: per-layer checkpoints padded and sliced, adapters padded, the compact layout's
remote code). Mutants marked ``equivalent`` are run too but left out of the kill rate (they cannot change any result;
the reason is printed). Runs fork a warm interpreter per mutant (torch, transformers and peft
imported once, prunelab never imported by the parent), so a mutant costs its tests' run time
plus ~1 s; ``--spawn`` starts a fresh interpreter per mutant instead (slower, ~10 s more
each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    module: str
    file: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...]
    equivalent: str = ""  # why it cannot change a result (then not counted)


IMP = "importance"
SPA = "sparsity solvers"
LHS = "LHSPG/knowledge/mixer"
ATP = "ATP generator+pruner"
LRP = "LoRAPrune"

T_IMP = ("tests/unit/test_formulas_importance.py", "tests/unit/test_importance.py")
T_SPA = ("tests/unit/test_formulas_sparsity.py", "tests/unit/test_sparsity.py")
T_LHS = ("tests/unit/test_formulas_lorashear.py", "tests/unit/test_lorashear.py")
T_ATP = ("tests/unit/test_formulas_atp.py", "tests/unit/test_atp.py")
T_LRP = ("tests/unit/test_formulas_importance.py", "tests/unit/test_loraprune.py")
T_ATPH = ("tests/unit/test_atp_head_dim.py",)  # ATP's paper attention space (shared head_dim channels)

TAYLOR = "src/prunelab/importance/taylor.py"
MAGN = "src/prunelab/importance/magnitude.py"
IMPI = "src/prunelab/importance/__init__.py"
SOLV = "src/prunelab/sparsity/solvers.py"
LHSPG = "src/prunelab/methods/lorashear/lhspg.py"
LSP = "src/prunelab/methods/lorashear/pruner.py"
KNOW = "src/prunelab/methods/lorashear/knowledge.py"
MIX = "src/prunelab/methods/lorashear/mixer.py"
GEN = "src/prunelab/methods/atp/generator.py"
ATPP = "src/prunelab/methods/atp/pruner.py"
LGRAD = "src/prunelab/importance/lora_grad.py"
LRPP = "src/prunelab/methods/loraprune/pruner.py"
ARCH = "src/prunelab/structure/arch.py"
GROUPS = "src/prunelab/structure/groups.py"

EXP = "checkpoint export"
# the fast tests of test_export.py (node ids: its slow tables load in subprocesses, minutes each)
T_EXP = tuple(
    f"tests/unit/test_export.py::{t}"
    for t in (
        "test_padding_adds_nothing_but_zeros",
        "test_hidden_pruned_checkpoint_keeps_its_logits",
        "test_bad_layout_is_refused",
        "test_newer_families_load_with_plain_transformers",
        "test_padding_refused_before_loading_where_inexact",
        "test_phi3_compact_only",
        "test_recovery_adapter_loads_with_peft_onto_the_saved_base",
    )
)
EXPF = "src/prunelab/models/export.py"
REMOTE = "src/prunelab/models/remote_code/modeling_prunelab.py"
LOADF = "src/prunelab/models/loading.py"


def M(module, file, old, new, what, tests, equivalent=""):
    return Mutant(module, file, old, new, what, tests, equivalent)


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ importance
    M(IMP, TAYLOR, "return (w * g).abs()", "return w * g", "element1 without |·|", T_IMP),
    M(
        IMP,
        TAYLOR,
        "return (w * g - 0.5 * wfw).abs()  # element2",
        "return (w * g - wfw).abs()  # element2",
        "element2 without the ½ of the second-order term",
        T_IMP,
    ),
    M(
        IMP,
        TAYLOR,
        "return (w * g - 0.5 * wfw).abs()  # element2",
        "return (w * g + 0.5 * wfw).abs()  # element2",
        "element2 with + ½·wFw",
        T_IMP,
    ),
    M(IMP, TAYLOR, "wfw = w * f * w", "wfw = w * f", "second order w·F instead of w·F·w", T_IMP),
    M(
        IMP,
        TAYLOR,
        'if self.kind == "vector":\n            return w * g',
        'if self.kind == "vector":\n            return (w * g).abs()',
        "vector: |·| inside the group sum",
        T_IMP,
    ),
    M(
        IMP,
        TAYLOR,
        'per_member.append(s.abs() if self.kind == "vector" else s)',
        "per_member.append(s)",
        "vector=slice: no |·| after the group sum",
        T_IMP,
    ),
    M(
        IMP,
        TAYLOR,
        "per_member.append(channel_sums(sal, m).abs().sum(1))",
        "per_member.append(channel_sums(sal, m).sum(1).abs())",
        "vector (official): |·| after the head's sum, not per channel",
        T_IMP,
    ),
    M(IMP, TAYLOR, "g[k] += gr * (x.shape[0] / n)", "g[k] += gr / n", "mean gradient mis-weighted", T_IMP),
    M(IMP, TAYLOR, "f[k] += gr.pow(2) / n", "f[k] += gr.pow(2)", "Fisher summed, not averaged", T_IMP),
    M(IMP, TAYLOR, "f[k] += gr.pow(2) / n", "f[k] += gr.abs() / n", "Fisher from |g|, not g²", T_IMP),
    M(
        IMP,
        TAYLOR,
        "step = 1 if fisher else micro_batch",
        "step = micro_batch",
        "Fisher from micro-batch, not per-sample, gradients",
        T_IMP,
    ),
    M(
        IMP,
        MAGN,
        "grouped(t.detach().float(), m).abs().pow(self.p).sum(1)",
        "grouped(t.detach().float(), m).pow(self.p).sum(1)",
        "l1 magnitude of signed weights",
        T_IMP,
    ),
    M(IMP, IMPI, "return stacked.mean(0)", "return stacked.sum(0)", "aggregation mean = sum", T_IMP),
    M(
        IMP,
        IMPI,
        "return stacked.max(0).values",
        "return stacked.min(0).values",
        "aggregation max = min",
        T_IMP,
    ),
    M(IMP, IMPI, "return stacked[-1]", "return stacked[0]", "aggregation last = first", T_IMP),
    M(
        IMP,
        IMPI,
        "keep[order[:k]] = False",
        "keep[order[-k:]] = False",
        "select_masks drops the highest-scoring groups",
        T_IMP,
    ),
    M(
        IMP,
        IMPI,
        "pool.sort(key=lambda x: (x[0], x[1], x[2]))",
        "pool.sort(key=lambda x: (-x[0], x[1], x[2]))",
        "global ranking drops the highest",
        T_IMP,
    ),
    M(
        IMP,
        IMPI,
        "left = {k: scores[k].numel() - 1 for k in keys}",
        "left = {k: scores[k].numel() for k in keys}",
        "global ranking may empty a unit",
        T_IMP,
    ),
    M(
        IMP,
        TAYLOR,
        "model.eval()  # no dropout; gradients still flow",
        "pass",
        "gradients in training mode",
        T_IMP,
        equivalent="no dropout in the supported families at attention_dropout 0: train/eval forwards agree",
    ),
    M(
        IMP,
        TAYLOR,
        "return wfw.abs()",
        "return wfw",
        "second order without |·|",
        T_IMP,
        equivalent="w·F·w = F·w² with F a mean of squares: never negative",
    ),
    # ------------------------------------------------------------------ sparsity solvers
    M(
        SPA,
        SOLV,
        "score = w.abs().float() * stats.col_sq.sqrt()[None, :]",
        "score = w.abs().float() * stats.col_sq[None, :]",
        "Wanda with Σx² instead of ‖x‖",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "score = w.abs().float() * stats.col_sq.sqrt()[None, :]",
        "score = w.float() * stats.col_sq.sqrt()[None, :]",
        "Wanda on signed weights",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "keep = keep_mask(w.abs(), sparsity, pattern, scope)",
        "keep = keep_mask(w, sparsity, pattern, scope)",
        "magnitude on signed weights",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]",
        "w1[:, i:] += err[:, None] * hinv1[i, i:][None, :]",
        "SparseGPT in-block update with the sign flipped",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "w[:, b:] -= err1 @ upper[a:b, b:]",
        "pass",
        "SparseGPT between-block update deleted",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "w[:, b:] -= err1 @ upper[a:b, b:]",
        "w[:, b:] += err1 @ upper[a:b, b:]",
        "SparseGPT between-block update with the sign flipped",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "score = w1.pow(2) / hdiag * live",
        "score = w1.pow(2) * live",
        "SparseGPT mask without [H⁻¹]_jj",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "hdiag = hinv1.diagonal().pow(2)[None, :]",
        "hdiag = hinv1.diagonal()[None, :]",
        "SparseGPT mask with the Cholesky diagonal unsquared",
        T_SPA,
    ),
    M(SPA, SOLV, "err = (col - q) / d", "err = col - q", "SparseGPT error not divided by [U]_ii", T_SPA),
    M(
        SPA,
        SOLV,
        "chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)",
        "chol, info = torch.linalg.cholesky_ex(h + damp * eye)",
        "SparseGPT damping absolute, not 1% of mean diag",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "w1[:, j].pow(2) / hdiag[:, j] * live[:, j], pattern.sparsity, pattern, scope",
        "w[:, a:b][:, j].pow(2) / hdiag[:, j] * live[:, j], pattern.sparsity, pattern, scope",
        "SparseGPT N:M groups chosen from the block-start weights",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "cum = [(2 * total * e + width) // (2 * width) for e in edges]",
        "cum = [(total * e) // width for e in edges]",
        "SparseGPT block counts floored, not rounded",
        T_SPA,
    ),
    M(SPA, SOLV, "u = xu.sub_(z)  # u + x − z", "u = torch.zeros_like(z)", "ADMM dual never updated", T_SPA),
    M(
        SPA,
        SOLV,
        "x = (b + rho * (z - u)) @ inv",
        "x = (b + rho * (z + u)) @ inv",
        "ADMM primal update with +U",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "keep = keep_mask(xu.abs(), s_k, pattern, scope)",
        "keep = keep_mask(x.abs(), s_k, pattern, scope)",
        "ADMM mask from |W|, not |W + U|",
        T_SPA,
    ),
    M(SPA, SOLV, "b = wt @ a", "b = wt", "ADMM B = W̃ (no Ĝ + λI)", T_SPA),
    M(
        SPA,
        SOLV,
        "wt = w.float() * d[None, :]",
        "wt = w.float() / d[None, :]",
        "ADMM normalisation inverted",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "return z / d[None, :], keep, {}",
        "return z, keep, {}",
        "ADMM output not de-normalised",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "lam = damping * gn.diagonal().mean()",
        "lam = damping * gn.diagonal().sum()",
        "ADMM λ from the trace, not the mean",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "torch.linalg.cholesky(a + rho * eye)",
        "torch.linalg.cholesky(a + eye)",
        "ADMM inverse without ρ",
        T_SPA,
    ),
    M(SPA, SOLV, "if k < frozen:", "if k < iterations:", "ADMM mask never frozen", T_SPA),
    M(
        SPA,
        SOLV,
        "return target * (1 - (1 - (k + 1) / mask_iterations) ** 3)",
        "return target * (1 - (1 - (k + 1) / mask_iterations) ** 2)",
        "ADMM schedule quadratic",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        's_k = cubic_schedule(target, k, frozen) if schedule == "cubic" else target',
        "s_k = target",
        "ADMM without the gradual schedule",
        T_SPA,
    ),
    M(
        SPA,
        SOLV,
        "xu = x + u  # once per iteration (bit-identical to u + x)",
        "xu = u + x  # once per iteration (bit-identical to u + x)",
        "ADMM x + u as u + x",
        T_SPA,
        equivalent="float addition is commutative: bit-identical",
    ),
    # ------------------------------------------------------------------ LHSPG / knowledge / mixer
    M(
        LHS,
        LHSPG,
        "lam = x.norm(dim=1, keepdim=True) / max(1, steps_left)",
        "lam = x.norm(dim=1, keepdim=True) / (2 * max(1, steps_left))",
        "λ at half speed",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "lam = x.norm(dim=1, keepdim=True) / max(1, steps_left)",
        "lam = w.norm(dim=1, keepdim=True) / max(1, steps_left)",
        "λ from ‖W‖ instead of ‖x‖",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "direction = torch.where(w_norm > 0, w / w_norm.clamp_min(1e-30), torch.zeros_like(w))",
        "direction = x / x.norm(dim=1, keepdim=True)",
        "LHSPG step along x/‖x‖ instead of W/‖W‖",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "new = x - lam * direction",
        "new = x + lam * direction",
        "LHSPG step away from zero",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "zero = (new * w).sum(1) < epsilon * w_norm.squeeze(1).pow(2)",
        "zero = (new * w).sum(1) > epsilon * w_norm.squeeze(1).pow(2)",
        "half-space projection inverted",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "zero = (new * w).sum(1) < epsilon * w_norm.squeeze(1).pow(2)",
        "zero = (new * x).sum(1) < epsilon * w_norm.squeeze(1).pow(2)",
        "half-space test against x, not W",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "new.zero_()  # the period ends: exactly zero",
        "pass",
        "no exact zero at the period's end",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "            _zero_lora(mod, m, sel)",
        "            pass",
        "redundant groups' LoRA slices not zeroed",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "grouped(_base(mod).float() + (_delta(mod) if lora_aware else 0), m)[sel.to(_base(mod).device)]",
        "grouped(_base(mod).float() + _delta(mod), m)[sel.to(_base(mod).device)]",
        "lora_aware=false still steps the effective weights",
        T_LHS,
    ),
    M(LHS, LHSPG, "b.weight.zero_()", "pass", "merge does not restart B", T_LHS),
    M(
        LHS,
        LHSPG,
        "return torch.stack([w.norm(dim=1), (w * d).sum(1).abs(), cos])",
        "return torch.stack([w.norm(dim=1), (w * d).sum(1), cos])",
        "saliency ⟨W, BA⟩ without |·|",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "cos = torch.nn.functional.cosine_similarity(w, d, dim=1) + 1",
        "cos = torch.nn.functional.cosine_similarity(w, d, dim=1)",
        "saliency cos without +1",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "scale = terms.max(dim=1).values if scale is None else scale",
        "scale = terms.sum(dim=1) if scale is None else scale",
        "saliency normalised by the sum, not the max",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "ws.append(grouped(_base(mod).float(), m).cpu())",
        "ws.append(grouped(_base(mod).float() + _delta(mod), m).cpu())",
        "saliency on W + BA instead of W",
        T_LHS,
    ),
    M(
        LHS,
        LHSPG,
        "w = _base(mod).float() + (_delta(mod) if effective else 0)",
        "w = _base(mod).float()",
        "group norms ignore B·A",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "s = s.masked_fill(redundant[u.key], math.inf)",
        "s = (-s).masked_fill(redundant[u.key], math.inf)",
        "unit scope selects the most salient groups",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "[s.masked_fill(redundant[u.key], math.inf) for s, u in zip(scores, mine, strict=True)]",
        "[(-s).masked_fill(redundant[u.key], math.inf) for s, u in zip(scores, mine, strict=True)]",
        "global scope selects the most salient groups",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "scores = [normalised_sum(t, scale) for t in terms]",
        "scores = [normalised_sum(t) for t in terms]",
        "global scope normalised per unit",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "u.n - max(1, math.ceil(self.lhspg.min_keep * u.n)) - int(redundant[u.key].sum()) for u in mine",
        "u.n - 1 - int(redundant[u.key].sum()) for u in mine",
        "min_keep ignored",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "left = max(1, end - step + 1)  # steps_left 1 = exactly zero now",
        "left = max(1, end - step)  # steps_left 1 = exactly zero now",
        "steps_left one short (zero a step early)",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "            if step == end:\n",
        "            if step == end:\n                merge_lora_into_base(peft_model)\n",
        "merge before the next selection (the issue-18.1 bug)",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "want = {u.key: round(p / n_sel * self.plan.remove[u.key]) for u in self.todo}",
        "want = {u.key: self.plan.remove[u.key] for u in self.todo}",
        "unit scope selects everything in the first period",
        T_LHS,
    ),
    M(
        LHS,
        LSP,
        "want = {kind: round(p / n_sel * total) for kind, total in self.totals.items()}",
        "want = {kind: total for kind, total in self.totals.items()}",
        "global scope selects everything in the first period",
        T_LHS,
    ),
    M(
        LHS,
        KNOW,
        "apply_masks(model, select_masks({unit.key: scores[unit.key]}, {unit.key: k}), arch)",
        "apply_masks(model, select_masks({unit.key: -scores[unit.key]}, {unit.key: k}), arch)",
        "knowledge probe removes the largest structures",
        T_LHS,
    ),
    M(
        LHS,
        KNOW,
        "unprunable = sorted(score, key=lambda k: -score[k])[:n_keep]",
        "unprunable = sorted(score, key=lambda k: score[k])[:n_keep]",
        "the least sensitive groups made unprunable",
        T_LHS,
    ),
    M(
        LHS,
        KNOW,
        "score = {k: sum(v.values()) / len(v) for k, v in deviations.items()}",
        "score = {k: max(v.values()) for k, v in deviations.items()}",
        "knowledge score max, not mean, over the ratios",
        T_LHS,
    ),
    M(
        LHS,
        KNOW,
        "deviations[unit.key][str(r)] = math.exp(cache.nll(unit.layer or 0)) - base",
        "deviations[unit.key][str(r)] = math.exp(cache.nll(unit.layer or 0)) / base",
        "deviation as a ratio, not a difference",
        T_LHS,
    ),
    M(
        LHS,
        KNOW,
        "n_keep = math.ceil(gamma * len(score) - 1e-9)",
        "n_keep = math.floor(gamma * len(score))",
        "γ fraction rounded down",
        T_LHS,
    ),
    M(LHS, KNOW, "t.copy_(copy)", "pass", "probe not restored", T_LHS),
    M(
        LHS,
        KNOW,
        "deviations[unit.key][str(r)] = math.exp(cache.nll(unit.layer or 0)) - base",
        "deviations[unit.key][str(r)] = math.exp(cache.nll(0)) - base",
        "probe run from layer 0 instead of its own layer",
        T_LHS,
        equivalent="the prefix cache holds the dense inputs of every layer: the same NLL from any earlier start",
    ),
    M(
        LHS,
        MIX,
        "self.eta * max(0.0, losses[s] - reference[s])",
        "self.eta * (losses[s] - reference[s])",
        "mixer: improvement counted as negative degradation",
        T_LHS,
    ),
    M(
        LHS,
        MIX,
        "self.eta * max(0.0, losses[s] - reference[s])",
        "self.eta * max(0.0, reference[s] - losses[s])",
        "mixer: degradation sign flipped",
        T_LHS,
    ),
    M(
        LHS,
        MIX,
        "[math.log(self.weights[s]) + self.eta * max(0.0, losses[s] - reference[s]) for s in self.sources]",
        "[self.eta * max(0.0, losses[s] - reference[s]) for s in self.sources]",
        "mixer forgets the previous weights",
        T_LHS,
    ),
    M(
        LHS,
        MIX,
        "self.eta * max(0.0, losses[s] - reference[s])",
        "max(0.0, losses[s] - reference[s])",
        "mixer ignores η",
        T_LHS,
    ),
    M(
        LHS,
        MIX,
        "w = self.floor + (1 - self.floor * len(self.sources)) * w",
        "w = self.floor + (1 - self.floor) * w",
        "mixer floor mixing does not sum to 1",
        T_LHS,
    ),
    M(
        LHS,
        MIX,
        "probs = torch.tensor([self.weights[s] for s in self.sources])",
        "probs = torch.ones(len(self.sources))",
        "mixer samples uniformly",
        T_LHS,
    ),
    # ------------------------------------------------------------------ ATP
    M(
        ATP,
        GEN,
        "s = torch.sigmoid((z + g + self.offset) / self.temperature)",
        "s = torch.sigmoid(z + g + self.offset)",
        "decisions without the temperature",
        T_ATP,
    ),
    M(
        ATP,
        GEN,
        "s = torch.sigmoid((z + g + self.offset) / self.temperature)",
        "s = torch.sigmoid((z + g) / self.temperature)",
        "decisions without the offset",
        T_ATP,
    ),
    M(ATP, GEN, "return u.log() - (-u).log1p()", "return u.log()", "noise log u, not logistic", T_ATP),
    M(
        ATP,
        GEN,
        "return hard + (soft - soft.detach())",
        "return hard",
        "no straight-through gradient",
        T_ATP,
    ),
    M(
        ATP,
        GEN,
        "hard = (soft >= 0.5).to(soft.dtype)",
        "hard = (soft >= 0.6).to(soft.dtype)",
        "hard threshold 0.6",
        T_ATP,
    ),
    M(
        ATP,
        GEN,
        "return {k: (z + self.offset) >= 0 for k, z in self.logits().items()}",
        "return {k: z >= 0 for k, z in self.logits().items()}",
        "deterministic decisions without the offset",
        T_ATP,
    ),
    M(
        ATP,
        GEN,
        "h = self.norm(self.proj(h))[0]",
        "h = self.proj(h)[0]",
        "generator without LayerNorm",
        T_ATP,
    ),
    M(
        ATP,
        GEN,
        "nn.init.orthogonal_(tokens)",
        "nn.init.normal_(tokens)",
        "input tokens not orthogonal",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "soft, hard = self.gen(noise=True)",
        "soft, hard = self.gen(noise=False)",
        "generator step without noise",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "(lm + m.budget_weight * bl).backward()",
        "(m.budget_weight * bl).backward()",
        "generator step without the LM loss",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "(lm + m.budget_weight * bl).backward()",
        "(lm + bl).backward()",
        "budget weight ignored",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        'self.gates.mode, self.gates.values = "soft", soft',
        'self.gates.mode, self.gates.values = "hard", soft',
        "generator step gates the frozen path only",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "bl = budget_loss(kept_fraction(hard, self.weights, self.prunable), self.target)",
        "bl = budget_loss(kept_fraction(soft, self.weights, self.prunable), self.target)",
        "budget loss on soft decisions",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        'self.gates.mode, self.gates.values = "hard", {k: v.float() for k, v in self.deterministic().items()}',
        'self.gates.mode, self.gates.values = "soft", {k: v.float() for k, v in self.deterministic().items()}',
        "LoRA step gates the merged path",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "return (kept.double().clamp_min(1e-12).log() - math.log(target)).abs()",
        "return (kept.double() - target).abs()",
        "budget loss linear, not log-ratio",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "return sum(decisions[k].sum() * w for k, w in weights.items()) / total",
        "return sum(decisions[k].mean() for k in weights) / len(weights)",
        "kept fraction of structures, not parameters",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "factor = (1 - threshold * groups.shape[1] ** 0.5 / groups.norm(dim=1).clamp_min(1e-30)).clamp_min(0)",
        "factor = (1 - threshold / groups.norm(dim=1).clamp_min(1e-30)).clamp_min(0)",
        "group lasso without √p_g",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "factor = torch.where(pruned.to(factor.device), factor, torch.ones_like(factor))",
        "factor = factor",
        "group lasso on every structure",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "group_lasso_prox(peft_model, self.arch, u, pruned, lr * self.method.lasso)",
        "group_lasso_prox(peft_model, self.arch, u, pruned, self.method.lasso)",
        "lasso threshold without lr_t",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        'self.handles.append(mod.base_layer.register_forward_hook(self._hook(u.key, m, "hard")))',
        'self.handles.append(mod.base_layer.register_forward_hook(self._hook(u.key, m, "soft")))',
        "soft gates on the frozen path too",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "(float(margins[k][i]), k, i) for k in keep for i in torch.nonzero(keep[k]).flatten().tolist()",
        "(-float(margins[k][i]), k, i) for k in keep for i in torch.nonzero(keep[k]).flatten().tolist()",
        "budget flips the most confident first",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "if weights[k] >= 2 * (kept - target):  # would land as far or farther on the other side",
        "if False:",
        "budget flip overshoots (the 18.3d bug)",
        T_ATP,
    ),
    M(
        ATP,
        ATPP,
        "target = (prunable - plan.requested * plan.params_before) / prunable  # kept fraction p",
        "target = 1 - plan.requested  # kept fraction p",
        "budget as a fraction of prunable, not all, parameters",
        T_ATP,
    ),
    # ATP's paper attention space (attention_space=head_dim): channel sizes, tiling, accounting
    M(
        ATP,
        ARCH,
        "rows = s.num_attention_heads + s.num_key_value_heads",
        "rows = s.num_attention_heads",
        "a q/k channel counted without its k rows",
        T_ATPH,
    ),
    M(
        ATP,
        ARCH,
        "return v + s.num_attention_heads * self.hidden_size",
        "return v",
        "a v/o channel counted without its o columns",
        T_ATPH,
    ),
    M(
        ATP,
        GROUPS,
        "return values.repeat(size // m.period) if m.period else values.repeat_interleave(m.width)",
        "return values.repeat_interleave(size // m.period) if m.period else values.repeat_interleave(m.width)",
        "a shared channel's gate spread over consecutive rows, not row j of every head",
        T_ATPH,
    ),
    M(
        ATP,
        GROUPS,
        "total += int((~keep).sum()) * per[kind](int(layer))",
        "total += int(keep.sum()) * per[kind](int(layer))",
        "the kept channels counted as masked",
        T_ATPH,
    ),
    # ------------------------------------------------------------------ LoRAPrune
    M(
        LRP,
        LGRAD,
        "return gb @ a_ + b_ @ ga - gb @ ga",
        "return gb @ a_ + b_ @ ga + gb @ ga",
        "Ĝ with +∇B·∇A",
        T_LRP,
    ),
    M(LRP, LGRAD, "return gb @ a_ + b_ @ ga - gb @ ga", "return gb @ a_ + b_ @ ga", "Ĝ without ∇B·∇A", T_LRP),
    M(LRP, LGRAD, "return gb @ a_ + b_ @ ga - gb @ ga", "return b_ @ ga - gb @ ga", "Ĝ without ∇B·A", T_LRP),
    M(
        LRP,
        LGRAD,
        "return (lora_grad_estimate(module, adapter) * merged_weight(module)).abs()",
        "return (lora_grad_estimate(module, adapter) * base_weight(module).detach().float()).abs()",
        "importance against W0, not W0 + s·B·A",
        T_LRP,
    ),
    M(
        LRP,
        LGRAD,
        "return (lora_grad_estimate(module, adapter) * merged_weight(module)).abs()",
        "return lora_grad_estimate(module, adapter) * merged_weight(module)",
        "importance without |·|",
        T_LRP,
    ),
    M(
        LRP,
        LGRAD,
        "return base_weight(module).detach().float() + lora_delta(module)",
        "return base_weight(module).detach().float()",
        "merged weight without s·B·A",
        T_LRP,
    ),
    M(
        LRP,
        LGRAD,
        "return (w.grad.float() * w.detach().float()).abs()",
        "return w.grad.float().abs()",
        "taylor ablation |∇W| without W",
        T_LRP,
    ),
    M(LRP, LGRAD, "total += s / norm", "total += s", "module scores not normalised", T_LRP),
    M(LRP, LGRAD, "norm = s.norm()", "norm = s.abs().sum()", "module scores L1-normalised", T_LRP),
    M(
        LRP,
        LGRAD,
        "s = grouped(element_importance(module, estimator), m).sum(1).cpu()",
        "s = grouped(element_importance(module, estimator), m).amax(1).cpu()",
        "structure score max, not sum, of its elements",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "self.beta * self.ema[k] + (1 - self.beta) * s",
        "(1 - self.beta) * self.ema[k] + self.beta * s",
        "moving average with β and 1 − β swapped",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "self.ema[k] = s if k not in self.ema else self.beta * self.ema[k] + (1 - self.beta) * s",
        "self.ema[k] = s",
        "no moving average",
        T_LRP,
    ),
    M(LRP, LRPP, "if not torch.isfinite(s).all():", "if False:", "non-finite scores averaged in", T_LRP),
    M(
        LRP,
        LRPP,
        "return 1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 3",
        "return 1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 2",
        "schedule quadratic",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "t0, t1 = warmup * total, (1 - cooldown) * total",
        "t0, t1 = warmup * total, total",
        "schedule without the cool-down",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "score = scores[key].masked_fill(~masks[key], math.inf)",
        "score = scores[key]",
        "masked structures re-selected",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "{k: round(frac * n) for k, n in self.remove_counts.items()}",
        "{k: int(frac * n) for k, n in self.remove_counts.items()}",
        "schedule counts truncated",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "if step % self.prune_freq and step != steps:",
        "if step % self.prune_freq:",
        "the last step not forced to the plan",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "return (args[0] * keep, *args[1:])",
        "return (args[0], *args[1:])",
        "masks not applied in the forward",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "mod, width = layers[u.layer].self_attn.o_proj, arch.group_size(u.layer) * arch.head_dim",
        "mod, width = layers[u.layer].self_attn.o_proj, arch.head_dim",
        "a KV group masks one head's o columns",
        T_LRP,
    ),
    M(
        LRP,
        LRPP,
        "drop = torch.sort(score, stable=True).indices[: k - have]",
        "drop = torch.sort(-score, stable=True).indices[: k - have]",
        "the highest-scoring structures masked",
        T_LRP,
    ),
    # ------------------------------------------------------------------ checkpoint export (issue 20)
    M(
        EXP,
        EXPF,
        "out[tuple(slice(0, n) for n in t.shape)] = t",
        "out[tuple(slice(s - n, s) for n, s in zip(t.shape, shape, strict=True))] = t",
        "padding at the start of every dimension instead of the end",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "t = p.data[tuple(slice(0, n) for n in shape)].clone()",
        "t = p.data[tuple(slice(s - n, s) for n, s in zip(shape, p.shape, strict=True))].clone()",
        "unpad keeps the end of every dimension",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "new[name] = _scaled(t, scale) if name in norms and scale != 1.0 else t",
        "new[name] = t",
        "padded RMSNorm weights not rescaled",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "new[name] = _scaled(t, scale) if name in norms and scale != 1.0 else t",
        "new[name] = _scaled(t, 1 / scale) if name in norms and scale != 1.0 else t",
        "padded RMSNorm weights scaled by √(H_padded/H)",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "scale = (config.hidden_size / pconf.hidden_size) ** 0.5",
        "scale = config.hidden_size / pconf.hidden_size",
        "the norm scale without the square root",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "out.rms_norm_eps = config.rms_norm_eps * hidden / padded_hidden",
        "out.rms_norm_eps = config.rms_norm_eps",
        "rms_norm_eps not rescaled in the padded config",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        'if name.endswith(("input_layernorm", "post_attention_layernorm", "model.norm"))',
        'if name.endswith(("input_layernorm", "post_attention_layernorm"))',
        "the final norm left out of the rescaled norms",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "if name in norms and scale != 1.0:\n            t = _scaled(t, scale)",
        "if False:\n            t = _scaled(t, scale)",
        "unpad does not scale the norms back",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "mod.variance_epsilon = compact.rms_norm_eps",
        "mod.variance_epsilon = config.rms_norm_eps",
        "unpad keeps the padded eps in the norms",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "heads = kv * g",
        "heads = kv",
        "padded query heads = KV heads (GQA groups lost)",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "padded_hidden = math.ceil(hidden / heads) * heads",
        "padded_hidden = math.floor(hidden / heads) * heads",
        "hidden size rounded down to the heads",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "out.intermediate_size = max(s.intermediate_size for s in shapes)",
        "out.intermediate_size = min(s.intermediate_size for s in shapes)",
        "MLP padded to the narrowest layer",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "model.lm_head.weight = model.model.embed_tokens.weight\n    # the model's",
        "pass\n    # the model's",
        "unpad does not re-tie lm_head to the sliced embeddings",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "mod.out_features, mod.in_features = mod.weight.shape",
        "mod.in_features, mod.out_features = mod.weight.shape",
        "unpad records a Linear's in/out features swapped",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "    write_remote_code(out, model.config)\n",
        "",
        "the compact layout without its remote code",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "out[key] = _pad(t, torch.Size((t.shape[0], cols))).contiguous()",
        "out[key] = t.contiguous()",
        "adapter lora_A not padded",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        'data["base_model_name_or_path"] = str(Path(base_dir).resolve())',
        "pass",
        "adapter keeps the in-memory base's name",
        T_EXP,
    ),
    M(
        EXP,
        REMOTE,
        "attn.o_proj = _linear(attn.o_proj, q, h)",
        "attn.o_proj = _linear(attn.o_proj, kv, h)",
        "remote code builds o_proj for the KV width",
        T_EXP,
    ),
    M(
        EXP,
        REMOTE,
        "build_layer_shapes(self, config)\n\n\nclass PrunedMistral",
        "pass\n\n\nclass PrunedMistral",
        "remote LLaMA class builds the dense shapes",
        T_EXP,
    ),
    M(
        EXP,
        REMOTE,
        "norm.weight = nn.Parameter(norm.weight.data.new_ones(n))",
        "pass",
        "remote code keeps OLMo-2's q/k norms at the dense width",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        'if arch.family.proj_norms and "attn" in kinds:',
        'if arch.family.proj_norms and "attn" in kinds and False:',
        "the runner pads OLMo-2 with pruned heads",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "    if arch.family.proj_norms and any(s.num_key_value_heads != kv for s in shapes):",
        "    if False:",
        "save pads OLMo-2 with per-layer head counts",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        'if (arch.family.fused_qkv or arch.family.fused_gate_up) and kinds & {"attn", "mlp"}:',
        'if (arch.family.fused_qkv or arch.family.fused_gate_up) and kinds & {"attn"}:',
        "the runner pads Phi-3 when only its MLP is pruned",
        T_EXP,
    ),
    M(
        EXP,
        EXPF,
        "    if arch.family.fused_qkv or arch.family.fused_gate_up:\n        raise",
        "    if False:\n        raise",
        "save pads Phi-3's fused projections",
        T_EXP,
    ),
    M(
        EXP,
        LOADF,
        "        unpad(model)",
        "        pass",
        "load_pretrained keeps the padding",
        T_EXP,
    ),
]

PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "peft",
    "omegaconf",
    "hydra",
    "pytest",
    "safetensors",
    "matplotlib",
    "matplotlib.pyplot",
    "tokenizers",
    "datasets",
)


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests", "conf"):  # conf/: the Hydra configs the tests load
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "conftest.py"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",  # a restored file must never be shadowed by a mutant's .pyc
        PYTHONPATH=os.pathsep.join([str(copy / "src"), str(copy)]),
    )
    return env


def _pytest_args(tests: tuple[str, ...]) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]


def _run_spawn(copy: Path, tests: tuple[str, ...], log: Path, timeout: float) -> int:
    with open(log, "w") as out:
        try:
            return subprocess.run(
                [sys.executable, "-m", "pytest", *_pytest_args(tests)],
                cwd=copy,
                env=_env(copy),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            return -9


def _run_fork(copy: Path, tests: tuple[str, ...], log: Path, timeout: float) -> int:
    pid = os.fork()
    if pid == 0:  # the child: import prunelab from the copy, run pytest, exit
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(copy)
            os.environ.update(_env(copy))
            sys.dont_write_bytecode = True
            sys.path[:0] = [str(copy / "src"), str(copy)]
            import pytest

            rc = int(pytest.main(_pytest_args(tests)))
        except BaseException as e:
            print(f"mutant runner child failed: {e!r}", flush=True)
            rc = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        try:
            time.sleep(0.05)
        except BaseException:  # stopped (SIGTERM / ^C): the running child goes too
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", help="run only this module's mutants (repeatable)")
    ap.add_argument("--only", help="run only mutants whose description contains this text")
    ap.add_argument(
        "--tests", nargs="+", help="run these tests (files or node ids) instead of each mutant's own"
    )
    ap.add_argument("--check", action="store_true", help="only check that every snippet matches once")
    ap.add_argument("--spawn", action="store_true", help="a fresh interpreter per mutant (no fork)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant (a timeout kills it)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy and the logs")
    args = ap.parse_args(argv)

    mutants = [
        m if not args.tests else Mutant(**{**m.__dict__, "tests": tuple(args.tests)})
        for m in MUTANTS
        if (not args.module or m.module in args.module) and (not args.only or args.only in m.what)
    ]
    if not mutants:  # an empty selection would run only the baseline suite and report nothing
        known = sorted({m.module for m in MUTANTS})
        print(f"no mutant matches --module {args.module} --only {args.only!r}; modules: {', '.join(known)}")
        return 2
    bad = []
    for m in mutants:
        n = (ROOT / m.file).read_text().count(m.old)
        if n != 1:
            bad.append(f"{m.file}: {m.what!r} — the original snippet occurs {n} times (expected 1)")
    if bad:
        print("stale mutants (the code changed; update experiments/mutants.py):\n  " + "\n  ".join(bad))
        return 2
    if args.check:
        print(f"{len(mutants)} mutants, every snippet matches exactly once")
        return 0

    os.environ["OMP_NUM_THREADS"] = "1"
    # a kill (SIGTERM) unwinds like ^C: the temporary copy is removed, the tree never touched
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.spawn:
        assert not any(k == "prunelab" or k.startswith(("prunelab.", "tests")) for k in sys.modules)
        import importlib

        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:
                continue
        import torch

        torch.set_num_threads(1)
        with contextlib.suppress(Exception):  # the model classes the tests build (lazy in transformers)
            from transformers import (  # noqa: F401
                AutoTokenizer,
                LlamaForCausalLM,
                MistralForCausalLM,
                Qwen2ForCausalLM,
            )
    run = _run_spawn if args.spawn else _run_fork

    before = {f: (ROOT / f).read_text() for f in {m.file for m in mutants}}
    tmp = Path(tempfile.mkdtemp(prefix="prunelab-mutants-"))
    results = []
    t_start = time.monotonic()
    try:
        copy = tmp / "repo"
        _copy_tree(copy)
        files = sorted({t for m in mutants for t in m.tests})
        t0 = time.monotonic()
        rc = run(copy, tuple(files), tmp / "baseline.log", args.timeout * 4)
        print(
            f"baseline ({len(files)} test files, unmutated): rc={rc} in {time.monotonic() - t0:.0f}s",
            flush=True,
        )
        if rc != 0:
            print((tmp / "baseline.log").read_text()[-4000:])
            print("the unmutated tests fail: fix them first")
            return 2
        for i, m in enumerate(mutants, 1):
            target = copy / m.file
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new, 1))
            log = tmp / f"mutant{i:03d}.log"
            t0 = time.monotonic()
            try:
                rc = run(copy, m.tests, log, args.timeout)
            finally:
                target.write_text(original)
            dt = time.monotonic() - t0
            killed = rc != 0
            tail = [ln for ln in log.read_text().splitlines() if ln.startswith(("FAILED", "ERROR"))][:1]
            results.append({**m.__dict__, "killed": killed, "rc": rc, "seconds": round(dt, 1), "by": tail})
            state = "killed" if killed else ("equivalent" if m.equivalent else "SURVIVED")
            print(f"[{i:3d}/{len(mutants)}] {state:10s} {dt:5.1f}s  {m.module}: {m.what}", flush=True)
    finally:
        if args.keep:
            print(f"copy and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - t_start
    changed = [f for f, text in before.items() if (ROOT / f).read_text() != text]
    if changed:  # only the copy is ever written; someone else edited these meanwhile
        print(f"note: {changed} changed in the working tree during the run (not by this script)")

    print()
    print("| module | mutants | equivalent | killed | survived | kill rate |")
    print("|---|---|---|---|---|---|")
    modules = list(dict.fromkeys(m.module for m in mutants))
    for mod in modules:
        rs = [r for r in results if r["module"] == mod]
        eq = [r for r in rs if r["equivalent"]]
        live = [r for r in rs if not r["equivalent"]]
        k = sum(r["killed"] for r in live)
        rate = f"{100 * k / len(live):.0f}%" if live else "–"
        print(f"| {mod} | {len(live)} | {len(eq)} | {k} | {len(live) - k} | {rate} |")
    survivors = [r for r in results if not r["killed"] and not r["equivalent"]]
    print()
    for r in survivors:
        print(f"SURVIVED  {r['module']}: {r['what']}  ({r['file']})")
    for r in results:
        if r["equivalent"]:
            print(
                f"equivalent ({'killed' if r['killed'] else 'survived'})  {r['module']}: {r['what']} — {r['equivalent']}"
            )
    print(f"\n{len(results)} mutants in {total / 60:.1f} min")
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "minutes": round(total / 60, 1)}, indent=2) + "\n"
        )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
