"""Zero-shot multiple-choice evaluation through lm-eval, on a model held in memory.

Two families of tasks:
  - the *embedded* tasks (``EMBEDDED_TASKS``), built offline from the corpus test split, which
    the embedded models never trained on: sentence ending, cloze and word order, 4 choices each;
  - the *paper* tasks (``PAPER_TASKS``), lm-eval's own (BoolQ, PIQA, ...), which need the
    Hugging Face hub or its cache.

Tasks are data: ``tasks/*.yaml`` are lm-eval task templates whose ``{data_dir}`` is filled in by
``build_embedded_tasks``, which also writes the JSON-lines files next to them.

    from prunelab.evaluation.zeroshot import evaluate_zeroshot
    evaluate_zeroshot(model, tokenizer, ["prunelab_ending", "prunelab_cloze", "prunelab_order"])
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from prunelab.errors import ConfigError, bad_value

EMBEDDED_TASKS: tuple[str, ...] = ("prunelab_ending", "prunelab_cloze", "prunelab_order")
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TEMPLATE_DIR = Path(__file__).parent / "tasks"
NUM_CHOICES = 4
# Bump when the construction below changes, so that cached task builds are rebuilt.
_BUILD_VERSION = 1
_MANIFEST = "manifest.json"
_TASKS_KEY = "eval.zeroshot.tasks"

# Sentences that read as prose: 8-30 words, mostly plain words, capitalised, with end punctuation.
_MIN_WORDS, _MAX_WORDS = 8, 30
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_EDGE_PUNCT = ".,;:!?"
_ENDING_FRACTION = 0.6


# ---------------------------------------------------------------------------------------------
# Task construction
# ---------------------------------------------------------------------------------------------


def _is_plain_word(word: str) -> bool:
    core = word.strip(_EDGE_PUNCT)
    return core.isascii() and core.replace("-", "").replace("'", "").isalpha()


def _is_prose(sentence: str, words: list[str]) -> bool:
    if not (_MIN_WORDS <= len(words) <= _MAX_WORDS):
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if sum(c.isalpha() or c == " " for c in sentence) < 0.9 * len(sentence):
        return False
    return sum(map(_is_plain_word, words)) >= 0.85 * len(words)


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """Unique prose sentences of the corpus test split, in corpus order."""
    from prunelab.data.corpus import documents

    seen: dict[str, None] = {}
    for doc in documents("test"):
        for para in re.split(r"\n\s*\n", doc.text):
            # Paragraphs are hard-wrapped: rejoin lines before splitting into sentences.
            for sentence in _SENTENCE_END.split(" ".join(para.split())):
                if _is_prose(sentence, sentence.split()):
                    seen.setdefault(sentence, None)
    return tuple(seen)


def _example(
    sentence: str, context: str, true_choice: str, distractors: list[str], rng: random.Random
) -> dict:
    choices = [true_choice, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(true_choice), "sentence": sentence}


def _pick_close(
    rng: random.Random,
    key: float,
    pool: Sequence[tuple[float, str]],
    exclude: set[str],
    tolerances: Sequence[float],
) -> list[str]:
    """``NUM_CHOICES - 1`` distinct items of ``pool`` whose key is within the smallest tolerance that has enough."""
    for tol in tolerances:
        cands = sorted({s for k, s in pool if abs(k - key) <= tol and s not in exclude})
        if len(cands) >= NUM_CHOICES - 1:
            return rng.sample(cands, NUM_CHOICES - 1)
    raise ValueError("not enough distractors in the test split")


def _ending_task(sentences: Sequence[str], rng: random.Random, n: int) -> list[dict]:
    splits = []
    for s in sentences:
        words = s.split()
        cut = min(max(round(_ENDING_FRACTION * len(words)), 4), len(words) - 3)
        splits.append((s, " ".join(words[:cut]), " ".join(words[cut:])))
    # Distractor endings of about the same length: otherwise the summed log-likelihood (acc)
    # mostly measures choice length, which even a random model "knows".
    pool = [(float(len(end)), end) for _, _, end in splits]
    out = []
    for s, context, end in rng.sample(splits, min(n, len(splits))):
        distractors = _pick_close(rng, len(end), pool, {end}, (0.15 * len(end), 0.3 * len(end), math.inf))
        out.append(_example(s, context, end, distractors, rng))
    return out


def _cloze_task(sentences: Sequence[str], rng: random.Random, n: int) -> list[dict]:
    def content(word: str) -> bool:
        return len(word) >= 4 and word.isascii() and word.isalpha() and word.islower()

    freq = Counter(w for s in sentences for w in s.split() if content(w))
    # Key: length and log-frequency, so a distractor is neither rarer/commoner nor longer/shorter.
    by_len: dict[int, list[tuple[float, str]]] = {}
    for w, c in freq.items():
        by_len.setdefault(len(w), []).append((math.log2(c), w))
    eligible = [s for s in sentences if any(content(w) for w in s.split()[3:-1])]
    out = []
    for s in rng.sample(eligible, min(n, len(eligible))):
        words = s.split()
        i = rng.choice([j for j in range(3, len(words) - 1) if content(words[j])])
        word, rest = words[i], " ".join(words[i + 1 :])
        pool = [p for d in (-1, 0, 1) for p in by_len.get(len(word) + d, [])]
        pool = pool if len(pool) > 20 else [p for ps in by_len.values() for p in ps]
        distractors = _pick_close(
            rng, math.log2(freq[word]), pool, {w.lower() for w in words}, (1.0, 2.0, math.inf)
        )
        out.append(
            _example(s, " ".join(words[:i]), f"{word} {rest}", [f"{d} {rest}" for d in distractors], rng)
        )
    return out


def _order_task(sentences: Sequence[str], rng: random.Random, n: int) -> list[dict]:
    out = []
    for s in rng.sample(sentences, min(n, len(sentences))):
        # Keep the first word (document starts are capitalised: a free cue) and the final
        # punctuation in place: the variants differ from the sentence by word order only.
        words = s[:-1].split()
        variants: set[str] = set()
        for _ in range(100):
            i, j = sorted(rng.sample(range(1, len(words)), 2))
            if words[i] == words[j]:
                continue
            w = list(words)
            w[i], w[j] = w[j], w[i]
            variants.add(" ".join(w) + s[-1])
            variants.discard(s)
            if len(variants) == NUM_CHOICES - 1:
                break
        if len(variants) == NUM_CHOICES - 1:
            out.append(_example(s, "", s, rng.sample(sorted(variants), NUM_CHOICES - 1), rng))
    return out


_BUILDERS: dict[str, Callable[[Sequence[str], random.Random, int], list[dict]]] = {
    "prunelab_ending": _ending_task,
    "prunelab_cloze": _cloze_task,
    "prunelab_order": _order_task,
}


def make_task(task: str, seed: int = 0, num_examples: int = 300) -> list[dict]:
    """Examples of one embedded task: ``{"context", "choices", "label", "sentence"}`` dicts."""
    # A string seed is hashed with SHA-512 by ``random``: stable across runs and platforms.
    return _BUILDERS[task](prose_sentences(), random.Random(f"{task}:{seed}"), num_examples)


def _templates() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TEMPLATE_DIR.glob("*.yaml"))}


def embedded_task_names() -> tuple[str, ...]:
    """``EMBEDDED_TASKS`` plus any extra template YAML shipped in ``tasks/`` (a task is a file)."""
    return EMBEDDED_TASKS + tuple(t for t in _templates() if t not in EMBEDDED_TASKS)


def _write_atomic(path: Path, text: str) -> None:
    # Readers (a concurrent run, lm-eval) never see a half-written file.
    from prunelab.tracking.rundir import unique_tmp

    tmp = unique_tmp(path)  # per process and thread
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_embedded_tasks(out_dir: Path, seed: int = 0, num_examples: int = 300) -> Path:
    """Write the embedded tasks' JSON-lines files and task YAMLs into ``out_dir``; return it.

    ``out_dir`` is then an lm-eval ``include_path``. Cached: nothing is rewritten when it
    already holds a build for the same corpus, seed, size, templates and construction.
    """
    from prunelab.data.corpus import corpus_hash

    out_dir = Path(out_dir)
    templates = _templates()
    manifest = {
        "corpus_hash": corpus_hash(),
        "seed": seed,
        "num_examples": num_examples,
        "build_version": _BUILD_VERSION,
        "templates": hashlib.sha256(b"".join(p.read_bytes() for p in templates.values())).hexdigest()[:16],
    }
    mpath = out_dir / _MANIFEST
    with contextlib.suppress(OSError, ValueError):
        if json.loads(mpath.read_text()) == manifest:
            return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath.unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    for task in _BUILDERS:
        lines = (
            json.dumps({"id": f"{task}-{k}", **ex}, ensure_ascii=False)
            for k, ex in enumerate(make_task(task, seed, num_examples))
        )
        _write_atomic(out_dir / f"{task}.jsonl", "\n".join(lines) + "\n")
    # JSON string escapes are valid inside YAML double quotes, where the templates put {data_dir}.
    data_dir = json.dumps(str(out_dir.resolve()))[1:-1]
    for name, path in templates.items():
        _write_atomic(out_dir / f"{name}.yaml", path.read_text().replace("{data_dir}", data_dir))
    _write_atomic(mpath, json.dumps(manifest, indent=2) + "\n")
    return out_dir


def default_tasks_dir() -> Path:
    """Where ``evaluate_zeroshot`` builds the embedded tasks when no ``include_path`` is given."""
    root = os.environ.get("PRUNELAB_CACHE") or Path.home() / ".cache" / "prunelab"
    return Path(root) / "zeroshot_tasks"


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag lm-eval's own registry knows (its index takes ~10-40 s to build,
    so it is built only for a task that is neither embedded nor one of the papers')."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def check_tasks(tasks: Sequence[str], include_defaults: bool) -> None:
    """Raise ``ConfigError`` for a task name that is not available. Embedded and the papers'
    tasks are checked from names alone; any other task (``rte``, ``mmlu``, …) against
    lm-eval's registry, with its closest name as a suggestion."""
    allowed = embedded_task_names() + (PAPER_TASKS if include_defaults else ())
    if isinstance(tasks, str) or not tasks:
        raise ConfigError(
            f"{_TASKS_KEY}={tasks!r} must be a non-empty list of tasks; allowed: {', '.join(allowed)}"
        )
    for task in tasks:
        if task in allowed:
            continue
        if task in PAPER_TASKS:
            raise ConfigError(
                f"{bad_value(_TASKS_KEY, task, allowed)} (paper tasks need eval.zeroshot.include_defaults=true)"
            )
        if not include_defaults:
            raise ConfigError(
                f"{bad_value(_TASKS_KEY, task, allowed)} (lm-eval's own tasks — rte, mmlu, … — need "
                "eval.zeroshot.include_defaults=true)"
            )
        known = lm_eval_task_names()
        if task not in known:
            import difflib

            close = difflib.get_close_matches(task, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{_TASKS_KEY}: lm-eval knows no task {task!r}{hint} (`lm_eval ls tasks` lists all {len(known)})"
            )


def shots_of(num_fewshot: int | dict | None, task: str) -> int:
    """``eval.zeroshot.num_fewshot``: null (0, the papers' zero-shot protocol), one int for every
    task, or ``{task: shots}`` (unlisted tasks: 0)."""
    if num_fewshot is None:
        return 0
    value = num_fewshot.get(task, 0) if isinstance(num_fewshot, dict) else num_fewshot
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"eval.zeroshot.num_fewshot={num_fewshot!r}: expected null, an int >= 0 or {{task: int >= 0}}"
        )
    return value


# Keys of a zero-shot result that are not tasks.
NOT_TASKS = ("average", "n_shot", "reported")
_METRIC_KEY = "eval.zeroshot.metric"
_METRIC_ALLOWED = (
    "null (acc for every task), a metric name for every task (acc, acc_norm, …), or {task: metric}"
)


def check_metric(metric: str | dict | None, tasks: Sequence[str]) -> None:
    """``eval.zeroshot.metric``: which recorded metric each task contributes to the reported
    average (the papers differ: LLM-Pruner's tables use acc_norm for HellaSwag, ARC-c, OBQA)."""
    if metric is None:
        return
    if isinstance(metric, str) and metric:
        chosen = {str(t): metric for t in tasks}
    elif not isinstance(metric, dict) or not all(isinstance(v, str) and v for v in metric.values()):
        raise ConfigError(f"{_METRIC_KEY}={metric!r} is not allowed; allowed: {_METRIC_ALLOWED}")
    else:
        extra = sorted(set(metric) - set(tasks))
        if extra:
            raise ConfigError(f"{_METRIC_KEY} names {extra}, not in eval.zeroshot.tasks {list(tasks)}")
        chosen = metric
    for (
        task,
        name,
    ) in chosen.items():  # the tasks whose metrics are known: refused before, not after, the evaluation
        known = recorded_metrics(task)
        if known and name not in known:
            key = _METRIC_KEY if isinstance(metric, str) else f"{_METRIC_KEY}.{task}"
            raise bad_value(key, name, known)


def recorded_metrics(task: str) -> tuple[str, ...]:
    """The metrics a known task records (embedded and the papers' tasks); () for any other."""
    if task in ("boolq", "winogrande"):  # lm-eval's configs of these record acc only
        return ("acc",)
    if task in PAPER_TASKS or task in embedded_task_names():
        return ("acc", "acc_norm")
    return ()


def metric_of(metric: str | dict | None, task: str) -> str:
    if metric is None:
        return "acc"
    return metric.get(task, "acc") if isinstance(metric, dict) else metric


def reported_average(results: dict, metric: str | dict | None) -> dict:
    """``{"metric": {task: name}, "average": mean}``: the unweighted mean over tasks of each
    task's chosen metric (``eval.zeroshot.metric``). A task that did not record its metric
    is an error, not a silent fallback."""
    tasks = [t for t in results if t not in NOT_TASKS]
    chosen = {t: metric_of(metric, t) for t in tasks}
    for t, m in chosen.items():
        if m not in results[t]:
            raise ConfigError(
                f"{_METRIC_KEY}: task {t!r} recorded no {m!r}; it recorded {sorted(results[t])}"
            )
    values = [results[t][m] for t, m in chosen.items()]
    return {"metric": chosen, "average": sum(values) / len(values) if values else None}


class _DropExpected(logging.Filter):
    """Drops lm-eval warnings about what prunelab does on purpose (a model object, 0-shot)."""

    PREFIXES = (
        "`pretrained` model kwarg is not of type",
        "Passed an already-initialized model",
        "Overwriting default num_fewshot",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    root = logging.getLogger("lm_eval")
    level, flt = root.level, _DropExpected()
    # A logger's filters only see records logged on it, not its children's: attach to the emitters.
    emitters = [logging.getLogger(f"lm_eval.{m}") for m in ("models.huggingface", "evaluator")]
    root.setLevel(logging.WARNING)
    for logger in emitters:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in emitters:
            logger.removeFilter(flt)
        root.setLevel(level)


def _bos_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that starts every encoding with its BOS token.

    lm-eval conditions an empty context on the prefix token, but a non-empty one only on what
    the tokenizer emits. The embedded models saw the separator (= BOS) before every document,
    so every context starts with it too, as LLaMA tokenizers do by themselves.
    """
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a")["input_ids"][:1] == [bos]:
        return tokenizer
    tok = copy.deepcopy(tokenizer)  # never mutate the caller's tokenizer
    tok.add_bos_token = True
    if tok("a")["input_ids"][:1] != [bos]:
        raise ValueError(f"cannot make {type(tokenizer).__name__} prepend its BOS token")
    return tok


def _float(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # lm-eval reports "N/A" for an undefined stderr
        return math.nan


def make_lm(model, tokenizer, *, batch_size: int = 32, max_length: int = 256):
    """lm-eval's ``HFLM`` around an in-memory model, scoring the way the embedded models were trained."""
    from lm_eval.models.huggingface import HFLM

    model.eval()
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    with _quiet_lm_eval():
        lm = HFLM(
            pretrained=model,
            tokenizer=_bos_tokenizer(tokenizer),
            batch_size=batch_size,
            max_length=max_length,
            # The empty-context prefix must be a token the model was trained on: the separator.
            prefix_token_id=tokenizer.eos_token_id,
            # lm-eval 0.4.x's logits cache groups requests by their token sequence and scores all of a
            # group with one request's context/continuation split (lm-eval #2984): the order task's
            # ("", sentence) then overwrites the ending task's (start, " end"), same tokens.
            logits_cache=False,
        )
    from prunelab.models.placement import input_device, is_dispatched

    if is_dispatched(model):  # HFLM took model.device (its first parameter's: meta when offloaded)
        lm._device = input_device(model)
    if head is not None and head.weight is not head_weight:
        # HFLM calls model.tie_weights(): undo it for a model whose head was untied on purpose.
        head.weight = head_weight
    return lm


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: Path | None = None,
    include_defaults: bool = False,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int = 256,
    num_fewshot: int | dict | None = 0,
) -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` on ``tasks``: ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}}``.

    Adds ``"average": {"acc", "acc_norm"}``, the unweighted mean over tasks. Embedded tasks are
    built into ``default_tasks_dir()`` unless ``include_path`` holds them. ``limit`` keeps the
    first examples of each task. The model is left in eval mode, its weights untouched.
    """
    check_tasks(tasks, include_defaults)
    tasks = list(dict.fromkeys(tasks))  # a repeated task would be evaluated once anyway
    if include_path is None and any(t in embedded_task_names() for t in tasks):
        include_path = build_embedded_tasks(default_tasks_dir())

    with _quiet_lm_eval():
        import lm_eval
        from lm_eval.tasks import TaskManager

        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
        tm = TaskManager(
            include_path=str(include_path) if include_path else None, include_defaults=include_defaults
        )
        by_shots: dict[int, list[str]] = {}
        for task in tasks:
            by_shots.setdefault(shots_of(num_fewshot, task), []).append(task)
        out: dict = {"results": {}}
        for shots, group in sorted(by_shots.items()):  # one lm-eval call per shot count
            part = lm_eval.simple_evaluate(
                model=lm,
                tasks=group,
                task_manager=tm,
                num_fewshot=shots,
                limit=limit,
                log_samples=False,
                # No reseeding of the caller's global RNGs: zero-shot scoring draws no random
                # numbers (few-shot example sampling is seeded by lm-eval's fewshot_random_seed).
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
            out["results"].update(part["results"])
            out.setdefault("n-shot", {}).update(part.get("n-shot", {}))
    model.eval()

    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        r = out["results"][task]
        # every numeric metric lm-eval reports (acc, acc_norm, exact_match, …), unfiltered ("none")
        results[task] = {
            k.split(",")[0]: _float(v)
            for k, v in r.items()
            if k.endswith(",none") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    results["average"] = {
        m: sum(vals) / len(vals)
        for m in ("acc", "acc_norm")
        if (vals := [r[m] for r in results.values() if m in r])
    }
    shots = {t: int(out.get("n-shot", {}).get(t, 0)) for t in tasks if shots_of(num_fewshot, t)}
    if shots:  # what lm-eval ran, recorded when any task is few-shot
        results["n_shot"] = shots
    return results
