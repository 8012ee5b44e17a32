"""Shared fixtures: tiny seeded in-memory models of each supported family, offline env."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist the cores are split between the workers (and the subprocesses the tests
# start inherit the share): oversubscribed OpenMP threads slow torch down many times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
torch.set_num_threads(min(2, torch.get_num_threads(), _SHARE))


def make_model(
    family: str = "llama",
    kv: int = 4,
    heads: int = 4,
    layers: int = 3,
    hidden: int = 64,
    inter: int = 96,
    seed: int = 0,
    vocab: int = 128,
    max_pos: int = 64,
    tie: bool | None = None,
    head_dim: int | None = None,
):
    """A tiny random causal LM of a supported family (fp32, eval mode). The newer families
    (qwen3, olmo2, gemma2, gemma3) get random norm weights too (their head / projection /
    post-feedforward norms would otherwise be all ones — or zeros under Gemma's (1 + w) — and a
    wrong slice of them would go unseen); Gemma 2/3 alternate sliding (4 tokens, shorter than
    the test windows) and full attention layers."""
    import transformers as tf
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_pos,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=bool(tie)))
    elif family == "llama_bias":
        model = LlamaForCausalLM(
            LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
        )
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, tie_word_embeddings=bool(tie)))
    elif family == "qwen3_bias":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, attention_bias=True, tie_word_embeddings=True))
    elif family == "olmo2":
        model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**common))
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    elif family in ("gemma2", "gemma3"):
        types = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
        gemma = dict(common, sliding_window=4, layer_types=types, query_pre_attn_scalar=common["head_dim"])
        if family == "gemma2":  # soft-capping on, as in the released models
            model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**gemma, attn_logit_softcapping=50.0))
        else:
            model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**gemma))
    else:
        raise ValueError(family)
    if family in NEW_FAMILIES:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    # Random-init biases are zero; make them non-zero so bias slicing is actually exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


NEW_FAMILIES = ("qwen3", "qwen3_bias", "olmo2", "gemma2", "gemma3", "phi3")
FAMILIES = [
    pytest.param(("llama", 4), id="llama-mha"),
    pytest.param(("llama", 2), id="llama-gqa"),
    pytest.param(("llama_bias", 2), id="llama-bias-gqa"),
    pytest.param(("mistral", 2), id="mistral-gqa"),
    pytest.param(("qwen2", 2), id="qwen2-gqa-bias"),
]


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tok():
    """The embedded tiny_llama's tokenizer (the vocabulary of the embedded corpus)."""
    from transformers import AutoTokenizer

    from prunelab.models.embedded import asset_dir

    return AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))


class Recorder:
    """A tracker that keeps what it is given (``log`` and ``image`` calls)."""

    def __init__(self):
        self.logged, self.images = [], []

    def log(self, data, step=None):
        self.logged.append((step, data))

    def image(self, key, path):
        self.images.append((key, str(path)))


class LiveTensors:
    """Context manager: the most tensors of a shape (``(any, *shape)``) alive at once. Every
    tensor of that shape entering or leaving any torch op is tracked weakly until it is
    freed; the count is taken at every op."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.peak = 0

    def __enter__(self) -> LiveTensors:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        outer = self
        live: dict[int, weakref.ref] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves((args, kwargs, out)):
                    key = id(t)
                    if isinstance(t, torch.Tensor) and tuple(t.shape[1:]) == outer.shape and key not in live:
                        live[key] = weakref.ref(t, lambda _, k=key: live.pop(k, None))
                outer.peak = max(outer.peak, len(live))
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft(layers: int = 2, seed: int = 0, b_scale: float = 0.1, eval_mode: bool = True):
    """A tiny GQA LLaMA (make_model("llama", 2)) with a rank-4 LoRA on every linear and random
    (non-zero) B, so s·B·A ≠ 0 from the start: the formula tests' shared fixture model."""
    import torch
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        make_model("llama", 2, layers=layers, seed=seed),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(b_scale * torch.randn(p.shape, generator=g))
    return pm.eval() if eval_mode else pm


def structure_slices(
    kind: str, j: int, head_dim: int = 16, group: int = 2
) -> list[tuple[str, int, list[int]]]:
    """(module path, dim, indices) of structure j of make_model("llama", 2): an MLP channel, or
    KV group j (its ``group`` query heads); dim 0 = output rows, 1 = input columns."""
    if kind == "mlp":
        return [("mlp.gate_proj", 0, [j]), ("mlp.up_proj", 0, [j]), ("mlp.down_proj", 1, [j])]
    q = list(range(j * group * head_dim, (j + 1) * group * head_dim))
    kv = list(range(j * head_dim, (j + 1) * head_dim))
    return [
        ("self_attn.q_proj", 0, q),
        ("self_attn.k_proj", 0, kv),
        ("self_attn.v_proj", 0, kv),
        ("self_attn.o_proj", 1, q),
    ]
