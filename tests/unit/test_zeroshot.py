"""Zero-shot tasks built from the test split, and their evaluation through lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.evaluation import zeroshot
from prunelab.evaluation.zeroshot import (
    EMBEDDED_TASKS,
    build_embedded_tasks,
    check_tasks,
    evaluate_zeroshot,
    make_lm,
)
from prunelab.models.embedded import SEPARATOR

N = 40  # examples per task: enough to see the construction, cheap to build and score


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedded_tasks(tmp_path_factory.mktemp("zeroshot") / "seed0", seed=0, num_examples=N)


@pytest.fixture(scope="module")
def tokenizer():
    from prunelab.models.embedded import train_tokenizer

    return train_tokenizer(2048)


@pytest.fixture(scope="module")
def model(tokenizer):
    from tests.conftest import make_model

    return make_model(
        "llama", kv=4, heads=4, layers=2, hidden=64, inter=128, vocab=len(tokenizer), max_pos=256, tie=True
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _delimiter(yaml_path: Path) -> str:
    import yaml

    return yaml.safe_load(yaml_path.read_text())["target_delimiter"]


# --------------------------------------------------------------------------------------------
# Task construction
# --------------------------------------------------------------------------------------------


def test_templates_are_lm_eval_task_configs() -> None:
    import yaml

    for name in EMBEDDED_TASKS:
        text = (zeroshot.TEMPLATE_DIR / f"{name}.yaml").read_text()
        cfg = yaml.safe_load(text)
        assert cfg["task"] == name  # the file stem is the task name
        assert cfg["dataset_kwargs"]["data_files"]["test"] == "{data_dir}/" + f"{name}.jsonl"
        assert cfg["output_type"] == "multiple_choice" and cfg["test_split"] == "test"
        assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}


def test_each_example_has_one_choice_that_is_the_sentence(tasks_dir: Path) -> None:
    sentences = set(zeroshot.prose_sentences())
    for name in EMBEDDED_TASKS:
        examples = _read(tasks_dir / f"{name}.jsonl")
        assert len(examples) == N
        delim = _delimiter(tasks_dir / f"{name}.yaml")
        labels = set()
        for ex in examples:
            assert ex["sentence"] in sentences
            assert len(ex["choices"]) == 4 and len(set(ex["choices"])) == 4
            # What lm-eval scores is context + delimiter + choice: exactly one gives the sentence.
            rebuilt = [ex["context"] + delim + c if ex["context"] else c for c in ex["choices"]]
            assert [r == ex["sentence"] for r in rebuilt].count(True) == 1
            assert rebuilt[ex["label"]] == ex["sentence"]
            assert all(not c.startswith(" ") and c.strip() == c for c in ex["choices"])
            labels.add(ex["label"])
        assert labels == {0, 1, 2, 3}  # the answer position is shuffled
    # The order task has no context: it is scored from the model's document start.
    assert all(ex["context"] == "" for ex in _read(tasks_dir / "prunelab_order.jsonl"))
    assert _delimiter(tasks_dir / "prunelab_order.yaml") == ""


def test_cloze_distractors_are_single_words(tasks_dir: Path) -> None:
    for ex in _read(tasks_dir / "prunelab_cloze.jsonl"):
        rest = ex["choices"][ex["label"]].split(" ", 1)[1]
        for c in ex["choices"]:
            word, other_rest = c.split(" ", 1)
            assert other_rest == rest and word.isalpha() and len(word) >= 4


def test_build_is_deterministic_per_seed_and_cached(tmp_path: Path, tasks_dir: Path) -> None:
    again = build_embedded_tasks(tmp_path / "again", seed=0, num_examples=N)
    other = build_embedded_tasks(tmp_path / "other", seed=1, num_examples=N)
    for name in EMBEDDED_TASKS:
        assert (again / f"{name}.jsonl").read_bytes() == (tasks_dir / f"{name}.jsonl").read_bytes()
        assert (other / f"{name}.jsonl").read_bytes() != (tasks_dir / f"{name}.jsonl").read_bytes()
    # The YAML points at its own folder's data.
    assert str(again.resolve()) in (again / "prunelab_ending.yaml").read_text()

    stamp = (again / "prunelab_cloze.jsonl").stat().st_mtime_ns
    build_embedded_tasks(again, seed=0, num_examples=N)
    assert (again / "prunelab_cloze.jsonl").stat().st_mtime_ns == stamp  # cache hit: not rewritten
    build_embedded_tasks(again, seed=1, num_examples=N)
    assert (again / "prunelab_cloze.jsonl").read_bytes() == (other / "prunelab_cloze.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------------


def test_check_tasks_accepts_known_names() -> None:
    check_tasks(EMBEDDED_TASKS, include_defaults=False)
    check_tasks(["piqa", "prunelab_cloze"], include_defaults=True)


def test_unknown_task_names_the_key_and_the_allowed_list() -> None:
    with pytest.raises(ConfigError) as err:
        check_tasks(["prunelab_endng"], include_defaults=False)
    msg = str(err.value)
    assert "eval.zeroshot.tasks" in msg and "'prunelab_endng'" in msg
    assert "did you mean 'prunelab_ending'" in msg
    assert all(t in msg for t in EMBEDDED_TASKS)
    assert "piqa" not in msg  # paper tasks are not allowed without lm-eval's defaults

    with pytest.raises(ConfigError, match="include_defaults"):
        check_tasks(["piqa"], include_defaults=False)
    with pytest.raises(ConfigError):
        check_tasks([], include_defaults=False)


def test_any_lm_eval_task_is_accepted_and_a_typo_gets_lm_evals_closest_names() -> None:
    """Beyond the embedded and the papers' tasks, the names lm-eval's registry knows (built
    only for such a name)."""
    check_tasks(["rte", "mmlu", "prunelab_cloze"], include_defaults=True)
    with pytest.raises(ConfigError) as err:
        check_tasks(["hellaswag2"], include_defaults=True)
    msg = str(err.value)
    assert msg.startswith("eval.zeroshot.tasks: lm-eval knows no task 'hellaswag2'") and "'hellaswag'" in msg
    with pytest.raises(
        ConfigError, match=r"lm-eval's own tasks .* need eval\.zeroshot\.include_defaults=true"
    ):
        check_tasks(["rte"], include_defaults=False)


def test_num_fewshot_values() -> None:
    from prunelab.evaluation.zeroshot import shots_of

    assert shots_of(None, "rte") == 0 and shots_of(5, "rte") == 5
    assert shots_of({"mmlu": 5}, "mmlu") == 5 and shots_of({"mmlu": 5}, "rte") == 0
    for bad in (-1, 1.5, True, {"rte": "five"}):
        with pytest.raises(ConfigError, match=r"eval\.zeroshot\.num_fewshot="):
            shots_of(bad, "rte")


def test_few_shot_tasks_run_with_their_shots(model, tokenizer, tasks_dir: Path) -> None:
    """{task: shots} reaches lm-eval per task (one call per shot count); 0-shot runs record no n_shot."""
    zero = evaluate_zeroshot(model, tokenizer, EMBEDDED_TASKS[:2], include_path=tasks_dir, limit=6)
    few = evaluate_zeroshot(
        model,
        tokenizer,
        EMBEDDED_TASKS[:2],
        include_path=tasks_dir,
        limit=6,
        num_fewshot={EMBEDDED_TASKS[1]: 2},
    )
    assert "n_shot" not in zero and few["n_shot"] == {EMBEDDED_TASKS[1]: 2}
    assert few[EMBEDDED_TASKS[0]] == zero[EMBEDDED_TASKS[0]]  # the 0-shot task is unchanged


def test_evaluate_rejects_unknown_task_before_loading(model, tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\.tasks"):
        evaluate_zeroshot(model, tokenizer, ["boolqq"], include_path=Path("/nonexistent"))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def test_evaluate_on_tiny_random_model(model, tokenizer, tasks_dir: Path) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # evaluation must switch it to eval mode and leave it there
    res = evaluate_zeroshot(model, tokenizer, EMBEDDED_TASKS, include_path=tasks_dir, limit=8, batch_size=16)
    assert set(res) == {*EMBEDDED_TASKS, "average"}
    for name in EMBEDDED_TASKS:
        assert set(res[name]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert 0.0 <= res[name]["acc"] <= 1.0 and 0.0 <= res[name]["acc_norm"] <= 1.0
        assert res[name]["acc"] * 8 == pytest.approx(round(res[name]["acc"] * 8))  # limit=8 was applied
    assert res["average"]["acc"] == pytest.approx(sum(res[t]["acc"] for t in EMBEDDED_TASKS) / 3)
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id  # caller's tokenizer untouched


@torch.no_grad()
def _hand_logprob(model, ids: list[int], n_context: int) -> float:
    """Sum of log p(token | all previous) over ids[n_context:]."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_context, len(ids)))


@pytest.mark.parametrize("name", ["prunelab_ending", "prunelab_order"])
def test_lm_eval_loglikelihood_matches_hand_computed(model, tokenizer, tasks_dir: Path, name: str) -> None:
    """lm-eval's score for each choice is log p(choice | separator + context), with the right spacing."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([name], TaskManager(include_path=str(tasks_dir), include_defaults=False))[name]
    task.build_all_requests(limit=1)
    requests = task.instances
    ex = _read(tasks_dir / f"{name}.jsonl")[0]
    assert len(requests) == 4
    scores = [ll for ll, _ in make_lm(model, tokenizer).loglikelihood(requests, disable_tqdm=True)]

    sep = tokenizer.convert_tokens_to_ids(SEPARATOR)

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    context = [sep, *enc(ex["context"])] if ex["context"] else [sep]
    for req, choice, score in zip(requests, ex["choices"], scores, strict=True):
        text = ex["context"] + req.args[1]  # what lm-eval scored, as one string
        assert text == (f"{ex['context']} {choice}" if ex["context"] else choice)
        assert score == pytest.approx(_hand_logprob(model, [sep, *enc(text)], len(context)), abs=1e-4)


def test_same_tokens_split_differently_are_scored_apart(model, tokenizer) -> None:
    """One sentence as (start, " end") and as ("", sentence): lm-eval's logits cache would merge them."""
    from lm_eval.api.instance import Instance

    sentence = "Return the number of items in the container."
    start, end = sentence.split(" ", 4)[:4], sentence.split(" ", 4)[4]
    args = [(" ".join(start), " " + end), ("", sentence)]
    requests = [Instance("loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]
    got = [ll for ll, _ in make_lm(model, tokenizer).loglikelihood(requests, disable_tqdm=True)]

    sep = tokenizer.convert_tokens_to_ids(SEPARATOR)
    ids = [sep, *tokenizer(sentence, add_special_tokens=False)["input_ids"]]
    n_start = 1 + len(tokenizer(args[0][0], add_special_tokens=False)["input_ids"])
    assert got[0] == pytest.approx(_hand_logprob(model, ids, n_start), abs=1e-4)
    assert got[1] == pytest.approx(_hand_logprob(model, ids, 1), abs=1e-4)


def test_reported_average_takes_each_tasks_metric() -> None:
    """eval.zeroshot.metric picks, per task, which recorded metric enters the reported average
    (LLM-Pruner's tables: acc_norm for HellaSwag, ARC-c, OBQA; acc elsewhere)."""
    from prunelab.evaluation.zeroshot import check_metric, reported_average

    res = {
        "boolq": {"acc": 0.70},
        "hellaswag": {"acc": 0.50, "acc_norm": 0.70},
        "openbookqa": {"acc": 0.30, "acc_norm": 0.40},
        "average": {"acc": 0.5, "acc_norm": 0.55},
    }
    paper = {"hellaswag": "acc_norm", "openbookqa": "acc_norm"}
    rep = reported_average(res, paper)
    assert rep["metric"] == {"boolq": "acc", "hellaswag": "acc_norm", "openbookqa": "acc_norm"}
    assert rep["average"] == pytest.approx((0.70 + 0.70 + 0.40) / 3)
    assert reported_average(res, None)["average"] == pytest.approx((0.70 + 0.50 + 0.30) / 3)
    with pytest.raises(ConfigError, match=r"task 'boolq' recorded no 'acc_norm'"):
        reported_average(res, "acc_norm")
    check_metric(paper, ["boolq", "hellaswag", "openbookqa"])
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\.metric names \['piqa'\]"):
        check_metric({"piqa": "acc_norm"}, ["boolq"])
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\.metric=3 is not allowed"):
        check_metric(3, ["boolq"])
