"""The embedded default models: tiny LLaMAs that prunelab trains itself, offline.

The weights and tokenizer ship in ``prunelab/models/assets/<name>/``; this module is the
recipe that reproduces them (bitwise, for a fixed seed and step count on the same Python
minor version, whose standard library is the corpus):

    python -m prunelab.models.embedded --name tiny_llama        # ~10 min on 2 cores
    python -m prunelab.models.embedded --name tiny_llama_gqa

Shape rules (so the papers' pruning rules mean something at this scale): 8 decoder layers,
8 query heads per layer, embeddings ~13% of all parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunelab.data.corpus import corpus_hash, documents
from prunelab.evaluation.perplexity import window_nll

ASSETS = Path(__file__).parent / "assets"
SEPARATOR = "<|endoftext|>"  # document separator; also BOS/EOS/PAD, so every prefix token is trained


@dataclass(frozen=True)
class EmbeddedSpec:
    hidden_size: int = 128
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    intermediate_size: int = 384
    vocab_size: int = 2048
    max_position_embeddings: int = 256


SPECS = {
    "tiny_llama": EmbeddedSpec(),
    "tiny_llama_gqa": EmbeddedSpec(num_key_value_heads=4),
}


@dataclass
class TrainRecipe:
    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 250


def asset_dir(name: str) -> Path:
    return ASSETS / name


def train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the training split only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in documents("train")), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SEPARATOR,
        eos_token=SEPARATOR,
        pad_token=SEPARATOR,
        model_max_length=SPECS["tiny_llama"].max_position_embeddings,
    )


_STREAMS: dict[tuple, torch.Tensor] = {}


def token_stream(tokenizer, split: str, sources: tuple[str, ...] | None = None) -> torch.Tensor:
    """Documents of a split joined by the separator, starting with it (BOS). Kept per
    process by the tokenizer's content, split and sources: a run reads the same split for
    calibration, validation and several methods' own data (0.7 s per tokenization of train)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = None
    if backend is not None:
        key = (
            hashlib.sha1(backend.to_str().encode()).hexdigest(),
            split,
            tuple(sources) if sources else None,
        )
        if key in _STREAMS:
            return _STREAMS[key].clone()
    sep = tokenizer.convert_tokens_to_ids(SEPARATOR)
    ids = [sep]
    for d in documents(split, sources):
        ids.extend(tokenizer(d.text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(sep)
    out = torch.tensor(ids, dtype=torch.long)
    if key is not None:
        _STREAMS[key] = out
    return out.clone()


def build_model(spec: EmbeddedSpec, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def unigram_ppl(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test_ids].mean().item())


def train(name: str, recipe: TrainRecipe, out: Path | None = None) -> dict:
    from prunelab.progress import bar as progress_bar

    spec = SPECS[name]
    out = out or asset_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = train_tokenizer(spec.vocab_size)
    train_ids = token_stream(tokenizer, "train")
    val_ids = token_stream(tokenizer, "validation")
    test_ids = token_stream(tokenizer, "test")
    model = build_model(spec, recipe.seed)
    n_windows = (train_ids.numel() - 1) // recipe.seq_len
    gen = torch.Generator().manual_seed(recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return recipe.lr * (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.lr * (
            recipe.min_lr_frac + (1 - recipe.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))
        )

    history = []
    order = torch.randperm(n_windows, generator=gen)
    cursor = 0
    bar = progress_bar(range(recipe.steps), desc=f"train {name}")
    for step in bar:
        if cursor + recipe.batch_size > n_windows:  # new epoch, new random offset and order
            order, cursor = torch.randperm(n_windows, generator=gen), 0
        starts = order[cursor : cursor + recipe.batch_size] * recipe.seq_len
        cursor += recipe.batch_size
        batch = torch.stack([train_ids[s : s + recipe.seq_len + 1] for s in starts.tolist()])
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        # labels are shifted inside the model; the extra target token is unused on purpose
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            val = math.exp(window_nll(model, val_ids, 128))
            history.append(
                {"step": step + 1, "train_loss": loss.item(), "val_ppl": val, "time_s": time.time() - t0}
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", val_ppl=f"{val:.1f}")

    # Ship fp16 weights (size budget); every number below is measured on the shipped weights.
    model = model.half()
    model.config.dtype = "float32"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from transformers import AutoModelForCausalLM

    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    n_params = sum(p.numel() for p in shipped.parameters())
    n_embed = shipped.get_input_embeddings().weight.numel()
    report = {
        "name": name,
        "spec": asdict(spec),
        "recipe": asdict(recipe),
        "corpus_hash": corpus_hash(),
        "train_tokens": int(train_ids.numel()),
        "test_tokens": int(test_ids.numel()),
        "parameters": n_params,
        "embedding_fraction": n_embed / n_params,
        "test_ppl_seq128": math.exp(window_nll(shipped, test_ids, 128)),
        "train_ppl_seq128": math.exp(window_nll(shipped, train_ids[: test_ids.numel() * 4], 128)),
        "unigram_test_ppl": unigram_ppl(train_ids, test_ids, spec.vocab_size),
        "random_init_test_ppl": math.exp(window_nll(build_model(spec, recipe.seed), test_ids, 128)),
        "train_time_s": time.time() - t0,
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", choices=sorted(SPECS), default="tiny_llama")
    p.add_argument("--out", type=Path, default=None, help="default: the package's assets folder")
    p.add_argument("--threads", type=int, default=None)
    for f, v in asdict(TrainRecipe()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = TrainRecipe(**{f: getattr(args, f) for f in asdict(TrainRecipe())})
    report = train(args.name, recipe, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
