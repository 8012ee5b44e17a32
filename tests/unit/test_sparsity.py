"""Element-wise sparsity: patterns, the per-layer solvers and the block-by-block engine."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.sparsity import solvers
from prunelab.sparsity.engine import LINEARS, propagate, prune_layerwise
from prunelab.sparsity.patterns import (
    Pattern,
    check_mask,
    keep_mask,
    pack_mask,
    parse_pattern,
    prune_count,
    unpack_mask,
)
from tests.conftest import FAMILIES, make_model


# ------------------------------------------------------------------ patterns
def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern()
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern("4:8").sparsity == 0.5
    assert parse_pattern(" 1:4 ").sparsity == 0.75
    for bad, words in [
        ("4:4", "smaller than M"),
        ("5:4", "smaller than M"),
        ("0:4", "N ≥ 1"),
        ("2-4", "allowed"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_pattern(bad)
    with pytest.raises(ConfigError, match="quote it"):
        parse_pattern(124)  # what YAML 1.1 makes of an unquoted 2:4


@pytest.mark.parametrize(
    "rows, cols, sparsity", [(13, 24, 0.37), (64, 256, 0.5), (5, 7, 0.5), (100, 33, 0.9)]
)
def test_drop_lowest_rows_drops_exactly_the_lowest(rows, cols, sparsity):
    """The unsorted top-k path (shares differ by ≤ 1) against a per-row argsort."""
    from prunelab.sparsity.patterns import drop_lowest_rows, row_counts

    score = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    counts = row_counts(sparsity, rows, cols)
    ref = torch.ones_like(score, dtype=torch.bool)
    for r in range(rows):
        ref[r, torch.argsort(score[r])[: int(counts[r])]] = False
    assert torch.equal(drop_lowest_rows(score, counts), ref)
    uneven = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(1))  # the sorted path
    assert torch.equal((~drop_lowest_rows(score, uneven)).sum(1), uneven)


@pytest.mark.parametrize("rows, cols", [(1, 7), (13, 24), (11008, 4096), (4096, 11008), (333, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 1 / 3, 0.5, 0.6, 0.7, 0.9, 0.999])
def test_row_counts_vectorised_equals_the_scalar_rule(rows, cols, sparsity):
    from prunelab.sparsity.patterns import row_counts

    got = row_counts(sparsity, rows, cols)
    edges = [prune_count(sparsity, r * cols) for r in range(rows + 1)]
    assert got.tolist() == [b - a for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.7, 0.9])
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_unstructured_masks_are_exact(sparsity, scope):
    score = torch.rand(13, 24, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(score, sparsity, Pattern(), scope)
    check_mask(keep, sparsity, Pattern(), scope)
    assert int((~keep).sum()) == prune_count(sparsity, 13 * 24)  # the layer's share, in either scope
    per_row = (~keep).sum(1)
    if scope == "row":  # spread evenly: every row loses the floor or the ceiling of its share
        assert per_row.max() - per_row.min() <= 1
    # the pruned weights are the lowest-scoring ones
    if sparsity > 0:
        if scope == "layer":
            assert score[~keep].max() <= score[keep].min()
        else:
            for r in range(13):
                assert score[r][~keep[r]].max() <= score[r][keep[r]].min()


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4", "3:8", "1:2"])
def test_nm_masks(nm):
    pattern = parse_pattern(nm)
    score = torch.rand(6, 32, generator=torch.Generator().manual_seed(1))
    keep = keep_mask(score, pattern.sparsity, pattern, "layer")
    check_mask(keep, pattern.sparsity, pattern, "layer")
    groups, kept = score.reshape(-1, pattern.m), keep.reshape(-1, pattern.m)
    for g, k in zip(groups, kept, strict=True):
        assert g[~k].max() <= g[k].min()


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_relaxed_nm_mask_contains_nm_and_hits_density(scope):
    pattern = Pattern(2, 4)
    score = torch.rand(8, 16, generator=torch.Generator().manual_seed(2))
    strict = keep_mask(score, 0.5, pattern, scope)
    relaxed = keep_mask(score, 0.2, pattern, scope)
    assert bool((relaxed | ~strict).all())  # every N:M survivor kept
    assert int((~relaxed).sum()) == prune_count(0.2, 128)


def test_pack_roundtrip():
    keep = torch.rand(7, 13, generator=torch.Generator().manual_seed(3)) > 0.4
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_mask(packed, keep.shape), keep)


# ------------------------------------------------------------------ solvers on a tiny seeded layer
def _layer(out=24, inp=32, tokens=512, seed=0):
    """A weight and correlated inputs with uneven channel scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    scales = torch.exp(torch.randn(inp, generator=g))
    x = (torch.randn(tokens, inp, generator=g) @ mix) * scales
    w = torch.randn(out, inp, generator=g) / inp**0.5
    stats = solvers.InputStats(inp, gram=True)
    stats.add(x)
    return w, x, stats


def _err(x, w, w_new):
    return float(((x @ w.T - x @ w_new.T) ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_admm_reconstructs_better_than_wanda_and_magnitude(pattern):
    p = parse_pattern(pattern)
    sparsity = p.sparsity or 0.6
    w, x, stats = _layer()
    errs = {}
    for name in ("magnitude", "wanda", "sparsegpt", "admm"):
        new, keep, _ = solvers.SOLVERS[name](w, stats, sparsity, p, "row")
        check_mask(keep, sparsity, p, "row")
        assert torch.equal(new == 0, ~keep) or bool((new[~keep] == 0).all())
        errs[name] = _err(x, w, new)
        # the Gram-based error agrees with the explicit one
        rel = solvers.reconstruction_error(w, new, stats)
        assert rel == pytest.approx(errs[name] / float(((x @ w.T) ** 2).sum()), rel=1e-3)
    assert errs["admm"] < errs["wanda"] < errs["magnitude"], errs
    assert errs["admm"] < errs["magnitude"]


@pytest.mark.parametrize("shape,s", [((4096, 14336), 0.6), ((8192, 28672), 0.6), ((4096, 4096), 0.7)])
def test_sparsegpt_block_counts_exact_at_llama_sizes(shape, s):
    from prunelab.sparsity.solvers import _block_counts

    rows, cols = shape
    total = torch.tensor([prune_count(s, rows * cols)])
    counts = _block_counts(total, list(range(0, cols, 128)), cols)
    assert int(sum(c.sum() for c in counts)) == int(total) and all(int(c.min()) >= 0 for c in counts)


def test_sparsegpt_with_zero_sparsity_returns_the_weights_unchanged():
    w, _, stats = _layer()
    new, keep, info = solvers.sparsegpt(w, stats, 0.0, Pattern(), "layer", blocksize=8)
    assert keep.all() and torch.equal(new, w) and info["damping"] == 0.01


def test_sparsegpt_falls_back_when_the_factorisation_fails():
    w, _, stats = _layer()
    stats.gram.fill_(float("nan"))
    _, keep, info = solvers.sparsegpt(w, stats, 0.5, Pattern(), "layer", max_damping_retries=1)
    assert info["fallback"] == "wanda" and info["damping"] == pytest.approx(0.01 * 100)
    check_mask(keep, 0.5, Pattern(), "layer")


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_sparsegpt_exact_counts_across_blocks(scope):
    w, _, stats = _layer(out=7, inp=40)
    _, keep, _ = solvers.sparsegpt(w, stats, 0.55, Pattern(), scope, blocksize=16)
    check_mask(keep, 0.55, Pattern(), scope)


def test_admm_zero_sparsity_is_identity_and_schedule_is_cubic():
    w, _, stats = _layer()
    new, keep, _ = solvers.admm(w, stats, 0.0, Pattern(), "row")
    assert keep.all() and torch.allclose(new, w, atol=1e-5)
    s = [solvers.cubic_schedule(0.6, k, 15) for k in range(20)]
    assert s[0] == pytest.approx(0.6 * (1 - (14 / 15) ** 3))
    assert all(a < b for a, b in itertools.pairwise(s[:15])) and s[14:] == [0.6] * 6


def test_dead_input_columns_are_pruned_first_by_sparsegpt():
    w, x, _ = _layer()
    x[:, 3] = 0.0
    stats = solvers.InputStats(x.shape[1], gram=True)
    stats.add(x)
    _, keep, _ = solvers.sparsegpt(w, stats, 0.1, Pattern(), "row")
    assert not keep[:, 3].any()


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_propagation_matches_full_forward(family):
    model = make_model(*family, layers=3)
    calib = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    outs = propagate(model, calib, torch.device("cpu"), batch_size=2)
    hidden = torch.cat(outs)
    logits = model.lm_head(model.model.norm(hidden))
    ref = model(input_ids=calib).logits
    assert (logits - ref).abs().max().item() <= 1e-5


def test_engine_prunes_with_the_pruned_blocks_inputs():
    """Block i's statistics come from inputs that passed the already-pruned blocks 0..i-1."""
    model = make_model("llama", 2, layers=3)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    seen: dict[int, torch.Tensor] = {}

    def solve(name, w, stats):
        seen[len(seen)] = stats.col_sq.clone()
        return solvers.wanda(w, stats, 0.5, Pattern(), "row")

    masks, report = prune_layerwise(model, calib, solve, [0, 1, 2], LINEARS, False, torch.device("cpu"), 2)
    assert len(masks) == 3 * len(LINEARS) and all(r["sparsity"] == 0.5 for r in report.values())
    # After pruning, block 2's q_proj input under the *pruned* blocks 0-1 equals what it saw.
    captured = []
    h = model.model.layers[2].self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    model(input_ids=calib)
    h.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1])
    assert torch.allclose((x * x).sum(0), seen[2 * len(LINEARS)], rtol=1e-4)


def test_engine_without_calibration_runs_no_forward():
    model = make_model("llama", 2, layers=2)
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    masks, _ = prune_layerwise(
        model,
        None,
        lambda n, w, s: solvers.magnitude(w, s, 0.5, Pattern(2, 4), "layer"),
        [1],
        ("up_proj",),
        False,
        torch.device("cpu"),
    )
    assert calls == [] and list(masks) == ["model.layers.1.mlp.up_proj.weight"]
    assert (model.model.layers[1].mlp.up_proj.weight == 0).sum() == masks[
        "model.layers.1.mlp.up_proj.weight"
    ].numel() // 2


def _peak_live_activations(n: int, activations: str, tmp_path) -> int:
    """The most (batch, T, hidden) float tensors alive at once during a Wanda run of the
    engine over ``n`` calibration sequences: every tensor of that shape that enters or leaves
    any torch op is tracked (weakly) until it is freed; the count is taken at every op."""
    from tests.conftest import LiveTensors

    model = make_model("llama", 2, layers=3)
    shape = (16, model.config.hidden_size)
    calib = torch.randint(0, 128, (n, shape[0]), generator=torch.Generator().manual_seed(0))

    solve = lambda name, w, st: solvers.wanda(w, st, 0.5, Pattern(), "row")  # noqa: E731
    with LiveTensors(shape) as live:
        prune_layerwise(
            model,
            calib,
            solve,
            [0, 1, 2],
            LINEARS,
            False,
            torch.device("cpu"),
            2,
            activations=activations,
            activation_dir=tmp_path / activations,
        )
    assert not list((tmp_path / activations).rglob("*.safetensors"))  # nothing left behind
    return live.peak


def test_engine_live_activations_do_not_grow_with_calibration_samples(tmp_path):
    """Streamed through disk, the engine holds a fixed number of activation tensors whether it
    sees 4 or 16 calibration sequences; kept in memory, the count grows with n (the check can
    fail)."""
    streamed = {n: _peak_live_activations(n, "disk", tmp_path) for n in (4, 16)}
    assert streamed[4] == streamed[16] and streamed[4] > 0
    in_memory = {n: _peak_live_activations(n, "memory", tmp_path) for n in (4, 16)}
    assert in_memory[16] > in_memory[4] > streamed[4] - 1


def test_engine_disk_and_memory_stores_give_identical_pruning(tmp_path):
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    out = {}
    for where in ("memory", "disk"):
        model = make_model("llama", 2, layers=3)
        masks, _ = prune_layerwise(
            model,
            calib,
            lambda n, w, st: solvers.sparsegpt(w, st, 0.5, Pattern(), "row"),
            [0, 1, 2],
            LINEARS,
            True,
            torch.device("cpu"),
            4,  # 6 = 4 + 2: batches of two shapes
            activations=where,
            activation_dir=tmp_path,
        )
        out[where] = (masks, [p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(out["memory"][0][k], out["disk"][0][k]) for k in out["memory"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["memory"][1], out["disk"][1], strict=True))


def test_block_inputs_share_equal_arguments_and_keep_uncomparable_ones(tmp_path):
    from prunelab.sparsity.engine import ActivationStore, BlockInputs

    cpu = torch.device("cpu")
    x = torch.zeros(2, 4, 8)
    pos = torch.arange(4)[None]
    inputs = BlockInputs(ActivationStore("disk", cpu, tmp_path))
    inputs.add(x, {"position_ids": pos, "mask": None})
    inputs.add(x + 1, {"position_ids": pos.clone(), "mask": None})  # equal: shared
    masks = [object(), object()]  # a mask object built per forward (flex attention)
    inputs.add(x[:1], {"position_ids": pos, "mask": masks[0]})
    inputs.add(x[:1], {"position_ids": pos, "mask": masks[1]})
    kw = inputs.kwargs()
    assert kw[0] is kw[1] and kw[2]["mask"] is masks[0] and kw[3]["mask"] is masks[1]
    assert [float(t.mean()) for t in inputs.store] == [0.0, 1.0, 0.0, 0.0]


def test_activation_store_choice():
    from prunelab.sparsity.engine import pick_store

    calib = torch.zeros(128, 2048, dtype=torch.long)
    # LLaMA-7B in fp16, the papers' 128 × 2048: 2 × 128 × 2048 × 4096 × 2 bytes = 4096 MiB
    assert pick_store("auto", calib, 4096, torch.float16, 4096) == "memory"
    assert pick_store("auto", calib, 8192, torch.float16, 4096) == "disk"  # 70B
    assert pick_store("memory", calib, 8192, torch.float16, 0) == "memory"
    with pytest.raises(ConfigError, match=r"method.activations.*allowed"):
        pick_store("ssd", calib, 8, torch.float16, 1)


# ------------------------------------------------------------------ semi-structured kernels
def test_semi_structured_is_refused_plainly_on_cpu():
    from prunelab.sparsity.semi_structured import semi_structured, support

    ok, reason = support(torch.device("cpu"), torch.float16)
    assert not ok and "CUDA" in reason and "cpu" in reason
    model = make_model("llama", 2, layers=1, hidden=64, inter=128)
    w = model.model.layers[0].mlp.up_proj.weight
    with semi_structured(model, ["model.layers.0.mlp.up_proj.weight"]) as report:
        assert report == {"requested": True, "used": False, "reason": reason, "converted": 0}
    assert model.model.layers[0].mlp.up_proj.weight is w


CUDA_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not CUDA_SM80, reason="semi-structured kernels need a CUDA GPU with sm80+")
def test_semi_structured_kernels_match_dense_storage_on_gpu():
    from prunelab.sparsity.semi_structured import semi_structured

    model = make_model("llama", 4, heads=4, layers=2, hidden=128, inter=256).half().cuda()
    names = []
    for i, layer in enumerate(model.model.layers):
        for mod in (layer.mlp.up_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            mod.weight.data.mul_(keep_mask(mod.weight.abs(), 0.5, Pattern(2, 4)))
        names += [f"model.layers.{i}.mlp.{n}.weight" for n in ("up_proj", "gate_proj", "down_proj")]
    ids = torch.randint(0, 128, (4, 64), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        with semi_structured(model, names) as report:
            out = model(input_ids=ids).logits.float()
    assert report["used"] and report["converted"] == len(names), report
    assert (out - ref).abs().max().item() < 5e-2
    assert model.model.layers[0].mlp.up_proj.weight.layout == torch.strided


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_offload_one_block_at_a_time_matches_on_device():
    """Model in CPU memory, blocks visiting the GPU one at a time == the model on the GPU."""
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for home in ("cpu", "cuda"):
        model = make_model("llama", 2, layers=3).to(home)

        def solve(name, w, stats):
            return solvers.sparsegpt(w, stats, 0.5, Pattern(2, 4), "layer")

        prune_layerwise(model, calib, solve, [0, 1, 2], LINEARS, True, torch.device("cuda"), 2)
        assert next(model.parameters()).device.type == home  # blocks went back where they were
        results.append({n: p.detach().cpu() for n, p in model.named_parameters()})
    for n in results[0]:
        assert torch.allclose(results[0][n], results[1][n], atol=1e-4), n
