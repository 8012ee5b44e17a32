"""models/placement.py: a model dispatched over CPU + disk with accelerate computes exactly what
the undispatched one does, and a change made to an offloaded module inside ``materialized``
(a mask, a smaller shape) is written back into accelerate's offload store and persists."""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.models import placement
from tests.conftest import make_model

# 200 KB of CPU (of the 485 KB model): the embeddings stay, the rest goes to disk
TINY = {"cpu": 200_000}


@pytest.fixture
def pair(tmp_path):
    ref = make_model(layers=3)
    model = placement.dispatch(copy.deepcopy(ref), "auto", TINY, tmp_path)
    return ref, model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(placement.input_device(model))).logits


def test_split_over_cpu_and_disk_gives_the_same_logits(pair, inputs):
    ref, model = pair
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, model.hf_device_map
    assert placement.is_dispatched(model) and not placement.is_dispatched(ref)
    assert placement.input_device(model) == torch.device("cpu")
    assert torch.equal(_logits(model, inputs), _logits(ref, inputs))
    # a disk-offloaded block holds meta tensors outside materialized, real ones inside
    block = model.model.layers[-1]
    assert block.mlp.up_proj.weight.device.type == "meta"
    with placement.materialized(block):
        assert block.mlp.up_proj.weight.device == placement.execution_device(block)
        assert torch.equal(block.mlp.up_proj.weight, ref.model.layers[-1].mlp.up_proj.weight)
    assert block.mlp.up_proj.weight.device.type == "meta"


def test_a_change_inside_materialized_persists(pair, inputs):
    ref, model = pair
    for m in (model, ref):
        block = m.model.layers[-1]
        with placement.materialized(block), torch.no_grad():
            _logits(m, inputs)  # a forward inside (the engine's statistics) keeps the weights
            block.mlp.down_proj.weight[:, :7] = 0  # a mask, written in place
            block.self_attn.o_proj.weight.mul_(0.5)
    before = _logits(make_model(layers=3), inputs)
    after = _logits(model, inputs)
    assert not torch.equal(after, before)  # the change is in the forward …
    assert torch.equal(after, _logits(ref, inputs))  # … exactly as on the undispatched model
    with placement.materialized(model.model.layers[-1], write_back=False):
        assert not model.model.layers[-1].mlp.down_proj.weight[:, :7].any()


def test_a_smaller_shape_is_written_back(pair, inputs):
    ref, model = pair
    keep = torch.arange(0, 96, 2)
    for m in (model, ref):
        mlp = m.model.layers[-1].mlp
        with placement.materialized(m, "cpu"), torch.no_grad():
            for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
                lin.weight = torch.nn.Parameter(lin.weight.index_select(dim, keep))
    assert model.model.layers[-1].mlp.up_proj.weight.shape == (48, 64)
    assert torch.equal(_logits(model, inputs), _logits(ref, inputs))


def test_cpu_offloaded_weights_are_written_back(inputs):
    """The other store: accelerate's CPU offload (weights kept in a CPU state dict, as a
    GPU + CPU map offloads them) — tested with accelerate's cpu_offload on the CPU."""
    from accelerate import cpu_offload

    ref = make_model(layers=2)
    model = cpu_offload(copy.deepcopy(ref), execution_device="cpu")
    model.hf_device_map = {"": "cpu"}
    assert placement.offloaded_units(model)
    with placement.materialized(model), torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:3] = 0
        ref.model.layers[0].mlp.up_proj.weight[:3] = 0
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert torch.equal(_logits(model, inputs), _logits(ref, inputs))


@pytest.mark.parametrize(
    "device_map,max_memory,problem",
    [
        ("auto", None, None),
        ({"model": "cpu", "lm_head": "disk"}, {"cpu": "2GiB"}, None),
        ({"model": "cuda:0"}, None, "names GPU 0 but this machine has no CUDA device"),
        ({"model": "cpu"}, {0: "1GB"}, "model.max_memory.0 names GPU 0"),
        ("auto", {"cpu": "-1GB"}, "model.max_memory.cpu='-1GB' is not allowed"),
        ("auto", {"cpu": 0}, "model.max_memory.cpu=0 is not allowed"),
    ],
)
def test_check_placement(device_map, max_memory, problem, tmp_path):
    problems = placement.check_placement(device_map, max_memory, str(tmp_path), cuda_count=0)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_sizes_and_devices():
    assert placement.parse_size("2GiB") == 2 * 2**30
    assert placement.parse_size("500MB") == 500 * 10**6
    assert placement.parse_size(123) == 123
    assert placement.parse_size("12 parsecs") is None
    assert placement.parse_device("cuda:3") == 3
    assert placement.parse_device(True) is None
    assert placement.normalize({"model": "cuda:1", "lm_head": "disk"}) == {"model": 1, "lm_head": "disk"}
