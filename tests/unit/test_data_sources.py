"""Text sources: hub configs on local fixtures (never the network), the embedded corpus, errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prunelab.data import sources as S
from prunelab.errors import ConfigError, bad_value
from prunelab.paths import conf_dir

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
WIKI_TRAIN = FIXTURES / "wikitext2-train-00000-of-00001.parquet"
WIKI_TEST = FIXTURES / "wikitext2-test-00000-of-00001.parquet"
PTB_VAL = FIXTURES / "ptb-validation.parquet"
PTB_TXT = FIXTURES / "ptb.train.txt"
C4_VAL = FIXTURES / "c4-validation.00000-of-00008.json.gz"
BOOKS = FIXTURES / "bookcorpus-train.parquet"
ALPACA = FIXTURES / "alpaca_data_cleaned.json"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub: offline flags set, and datasets' arrow cache kept out of ~/.cache."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets reads these at import time; patch the live values too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture(scope="module")
def tokenizer():
    from prunelab.models.embedded import asset_dir, train_tokenizer

    trained = asset_dir("tiny_llama")
    if (trained / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(trained)
    return train_tokenizer(2048)


@pytest.fixture(scope="module")
def embedded():
    return S.build_source(S.load_source_config("embedded"))


def hub(name: str, **local_files: Path) -> S.HubText:
    cfg = S.load_source_config(name)
    cfg.local_files = {k: str(v) for k, v in local_files.items()}
    source = S.build_source(cfg)
    assert isinstance(source, S.HubText)
    return source


def column(path: Path, field: str) -> list[str]:
    return pq.read_table(path).column(field).to_pylist()


# ----------------------------------------------------------------------------- hub configs, local files


def test_wikitext2_rows_joined_with_blank_lines_and_headings():
    source = hub("wikitext2", train=WIKI_TRAIN, test=WIKI_TEST)
    source.check()
    text = source.text("test")
    assert text == "\n\n".join(column(WIKI_TEST, "text"))
    # Blank rows are kept (the papers' protocol), so a heading sits between runs of newlines.
    assert text.startswith("\n\n = Cicely Mary Barker = \n\n\n\n\n Cicely Mary Barker ( 28 June")
    assert " flowers . \n\n\n\n\n = = Early life = = \n\n\n\n\n Barker was born" in text
    assert "Valkyria" not in text and "Valkyria" in source.text("train")  # splits stay apart
    assert source.text("test") is text  # cached per split


def test_ptb_sentences_joined_by_space_and_txt_uses_text_column():
    source = hub("ptb", validation=PTB_VAL, train=PTB_TXT)
    val = source.text("validation")
    assert val == " ".join(column(PTB_VAL, "sentence"))
    assert "\n" not in val and "pierre <unk> N years old" in val
    # The original ptb.train.txt goes through datasets' text builder (column "text"), one row per line.
    lines = PTB_TXT.read_text().splitlines()
    assert source.text("train") == " ".join(lines)


def test_c4_json_gz_text_only_and_max_rows():
    cfg = S.load_source_config("c4")
    cfg.local_files = {"validation": str(C4_VAL)}
    cfg.max_rows = {"validation": 3}
    source = S.build_source(cfg)
    with gzip.open(C4_VAL, "rt") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 4
    text = source.text("validation")
    assert text == " ".join(d["text"] for d in docs[:3])
    assert docs[3]["text"] not in text and "2019-04-25T12:57:54Z" not in text and "https://" not in text
    with pytest.raises(ConfigError, match="no split 'test'"):
        source.text("test")


def test_bookcorpus_parquet_train_only():
    source = hub("bookcorpus", train=BOOKS)
    assert source.text("train") == " ".join(column(BOOKS, "text"))
    with pytest.raises(ConfigError, match="bookcorpus"):
        source.text("validation")


def test_alpaca_examples_and_prompt_text():
    source = hub("alpaca_cleaned", train=ALPACA)
    rows = json.loads(ALPACA.read_text())
    expected = [{k: r[k] for k in ("instruction", "input", "output")} for r in rows]
    assert S.instruction_examples(source) == expected
    cfg = S.load_source_config("alpaca_cleaned")
    cfg.local_files = {"train": str(ALPACA)}
    assert S.instruction_examples(cfg, "train") == expected  # from a config node, too
    blocks = source.text("train").split("\n\n### Instruction:\n")
    assert len(blocks) == len(rows) + 1
    # Rows with an input get the "### Input:" section; rows without get the shorter preamble.
    with_input = next(r for r in rows if r["input"])
    assert (
        f"### Instruction:\n{with_input['instruction']}\n\n### Input:\n{with_input['input']}"
        in source.text("train")
    )
    assert S.format_alpaca(rows[0]).startswith("Below is an instruction that describes a task. Write")
    assert S.format_alpaca(rows[0]).endswith("### Response:\n" + rows[0]["output"])
    with pytest.raises(ConfigError, match="no split 'test'"):
        source.instruction_examples("test")


def test_non_instruction_hub_data_has_no_instruction_examples():
    with pytest.raises(ConfigError, match="no instruction data"):
        hub("bookcorpus", train=BOOKS).instruction_examples("train")


# the hub calls themselves: tests/integration/test_hub_data.py (the real clients against a
# local stand-in of the hub)


# ----------------------------------------------------------------------------- tokens and calibration


def test_hub_token_ids_are_bos_plus_text(tokenizer):
    source = hub("wikitext2", train=WIKI_TRAIN)
    ids = source.token_ids(tokenizer, "train")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[0].item() == tokenizer.bos_token_id
    assert ids[1:].tolist() == tokenizer(source.text("train"), add_special_tokens=False)["input_ids"]


def test_calibration_windows_shape_determinism_and_content(tokenizer):
    source = hub("wikitext2", train=WIKI_TRAIN)
    ids = source.token_ids(tokenizer, "train")
    a = source.calibration_windows(tokenizer, num_samples=6, seq_len=32, seed=0)
    b = source.calibration_windows(tokenizer, num_samples=6, seq_len=32, seed=0)
    c = source.calibration_windows(tokenizer, num_samples=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every window is a contiguous slice of the split's token ids.
    slices = {tuple(ids[i : i + 32].tolist()) for i in range(ids.numel() - 32)}
    assert all(tuple(row.tolist()) in slices for row in torch.cat([a, c]))


def test_calibration_windows_too_short_split(tokenizer):
    source = hub("ptb", validation=PTB_VAL)
    n = source.token_ids(tokenizer, "validation").numel()
    assert source.calibration_windows(tokenizer, 2, n - 1, seed=0, split="validation").shape == (2, n - 1)
    with pytest.raises(ValueError, match=rf"has {n} tokens, fewer than seq_len\+1={n + 1}"):
        source.calibration_windows(tokenizer, 2, n, seed=0, split="validation")


def test_embedded_text_and_tokens_match_token_stream(tokenizer, embedded):
    from prunelab.data.corpus import documents
    from prunelab.models.embedded import token_stream

    docs = documents("validation")
    text = embedded.text("validation")
    assert text.count(S.SEPARATOR) == len(docs) - 1 and text.startswith(docs[0].text)
    ids = embedded.token_ids(tokenizer, "validation")
    assert torch.equal(ids, token_stream(tokenizer, "validation"))
    # The joined text tokenizes to the same stream, minus the leading/trailing separator.
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:-1].tolist()
    assert embedded.calibration == S.Calibration(num_samples=16, seq_len=128, split="train")


def test_embedded_calibration_windows(tokenizer, embedded):
    a = embedded.calibration_windows(tokenizer, 8, 64, seed=3, split="validation")
    assert a.shape == (8, 64)
    assert torch.equal(a, embedded.calibration_windows(tokenizer, 8, 64, seed=3, split="validation"))
    assert not torch.equal(a, embedded.calibration_windows(tokenizer, 8, 64, seed=4, split="validation"))


def test_embedded_sources_subset():
    source = S.build_source({"name": "embedded", "sources": ["reference"]})
    from prunelab.data.corpus import documents

    assert source.text("test") == S.SEPARATOR.join(d.text for d in documents("test", ("reference",)))
    with pytest.raises(ConfigError, match="did you mean 'comments'"):
        S.build_source({"name": "embedded", "sources": ["coments"]})


def test_embedded_instruction_examples(embedded):
    examples = embedded.instruction_examples("test")
    assert examples == S.instruction_examples({"name": "embedded"}, "test")  # deterministic
    kinds = {e["instruction"] for e in examples}
    assert kinds == {S.COMPLETE_INSTRUCTION, S.DESCRIBE_INSTRUCTION}
    # Paragraphs are whitespace-normalised and drop reST underline lines ("=======").
    lines = embedded.text("test").splitlines()
    flat = " ".join(" ".join(ln for ln in lines if not re.fullmatch(r"\s*[*=\-~^#+]{3,}\s*", ln)).split())
    for e in examples:
        assert set(e) == {"instruction", "input", "output"} and e["input"] and e["output"]
        if e["instruction"] == S.COMPLETE_INSTRUCTION:
            assert f"{e['input']} {e['output']}" in flat  # the output continues the input
        else:
            assert e["input"] in flat and e["output"] not in e["input"]


def test_corpus_instruction_examples_exact():
    from prunelab.data.corpus import Document

    a = "The if statement is used for conditional execution of a block of code in a program."
    b = "It selects exactly one of the suites by evaluating the expressions one by one until true."
    doc = Document(
        "reference:if", "reference", f'The "if" statement\n******************\n\n{a}\n\n{b}\n\nshort.'
    )
    assert S.corpus_instruction_examples([doc]) == [
        {
            "instruction": S.COMPLETE_INSTRUCTION,
            "input": "The if statement is used for conditional execution",
            "output": "of a block of code in a program.",
        },
        {"instruction": S.DESCRIBE_INSTRUCTION, "input": b, "output": 'The "if" statement'},
    ]
    # Without a heading the title is the first sentence; comment documents hold one paragraph per line.
    comments = Document("comments:x.py", "comments", f"{a} More words here.\n{b}")
    described = S.corpus_instruction_examples([comments])[1]
    assert described == {"instruction": S.DESCRIBE_INSTRUCTION, "input": b, "output": a}


# ----------------------------------------------------------------------------- errors and configs


def test_bad_value_message():
    err = bad_value("data.name", "wikitxt", S.DATA_NAMES)
    assert isinstance(err, ValueError)
    assert str(err) == (
        "data.name='wikitxt' is not allowed; did you mean 'wikitext2'? "
        "allowed: embedded, wikitext2, ptb, c4, bookcorpus, alpaca_cleaned"
    )
    assert "did you mean" not in str(bad_value("x", "zzzzzz", ["a", "b"]))


def test_unknown_name_lists_allowed():
    with pytest.raises(ConfigError, match="did you mean 'wikitext2'") as e:
        S.build_source({"name": "wikitxt", "path": "wikitext"})
    assert all(n in str(e.value) for n in S.DATA_NAMES)
    with pytest.raises(ConfigError, match="did you mean 'alpaca_cleaned'"):
        S.load_source_config("alpaca-cleaned")


def test_unknown_key_and_bad_values():
    cfg = S.load_source_config("wikitext2")
    cfg_dict = dict(cfg)
    with pytest.raises(ConfigError, match="did you mean 'local_files'"):
        S.build_source({**cfg_dict, "local_file": "x.parquet"})
    with pytest.raises(ConfigError, match=re.escape("data.calibration.seq_len=0")):
        S.build_source({**cfg_dict, "calibration": {"num_samples": 4, "seq_len": 0}})
    with pytest.raises(ConfigError, match=re.escape("data.local_files.validaton is not a key")):
        S.build_source({**cfg_dict, "local_files": {"validaton": str(WIKI_TEST)}})
    with pytest.raises(ConfigError, match=re.escape("data._target_")):
        S.build_source({**cfg_dict, "_target_": "os.system"})


def test_missing_local_file_names_key(tmp_path):
    missing = tmp_path / "nope" / "test-00000-of-00001.parquet"
    source = hub("wikitext2", test=missing)
    with pytest.raises(ConfigError) as e:
        source.check()
    msg = str(e.value)
    assert "data.local_files.test" in msg and str(missing) in msg and "does not exist" in msg
    assert ".parquet" in msg  # says what is expected
    with pytest.raises(ConfigError, match=re.escape("data.local_files.test")):
        source.text("test")  # loading checks first, instead of a datasets traceback
    odd = tmp_path / "test.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="unknown format"):
        hub("wikitext2", test=odd).check()


def test_every_data_config_builds():
    paths = sorted((conf_dir() / "data").glob("*.yaml"))
    assert {p.stem for p in paths} >= set(S.DATA_NAMES)
    for path in paths:
        assert path.read_text().startswith(f"# prunelab data={path.stem}")
        source = S.build_source(S.load_source_config(path.stem))
        assert source.name == path.stem
        assert isinstance(source, S.TextSource)
        assert source.calibration.num_samples > 0 and source.calibration.seq_len > 0
        source.check()  # no local files configured: nothing to check, nothing downloaded
    assert isinstance(S.build_source(S.load_source_config("embedded")), S.EmbeddedText)


def test_conf_dir_is_repo_conf():
    assert (conf_dir() / "data" / "embedded.yaml").is_file()


def test_atp_domain_configs_read_local_files_in_their_hub_formats(tmp_path):
    # BillSum rows: text, summary, title; PubMedQA (pqa_artificial): pubid, question, context, long_answer, ...
    bills = [{"text": f"SECTION {i}. The Act may be cited.", "summary": "s", "title": "t"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(bills), tmp_path / "billsum_train.parquet")
    pq.write_table(pa.Table.from_pylist(bills[:2]), tmp_path / "billsum_test.parquet")
    source = hub(
        "legal_billsum", train=tmp_path / "billsum_train.parquet", test=tmp_path / "billsum_test.parquet"
    )
    assert source.text("test") == "\n\n".join(b["text"] for b in bills[:2])
    qa = [
        {
            "pubid": i,
            "question": "Does it help?",
            "context": {"contexts": ["c"], "labels": ["L"], "meshes": ["m"]},
            "long_answer": f"Answer {i}: the trial shows an effect.",
            "final_decision": "yes",
        }
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(qa), tmp_path / "pubmedqa.parquet")
    source = hub("health_pubmedqa", train=tmp_path / "pubmedqa.parquet")
    assert source.text("train") == "\n\n".join(q["long_answer"] for q in qa)
    with pytest.raises(ConfigError, match="no split 'test'"):
        source.text("test")


def test_embedded_domain_is_the_reference_source(embedded, tokenizer):
    domain = S.build_source(S.load_source_config("embedded_domain"))
    assert domain.sources == ("reference",)
    assert 0 < domain.token_ids(tokenizer, "test").numel() < embedded.token_ids(tokenizer, "test").numel()


def test_in_domain_eval_adds_the_run_data_test_split_to_perplexity():
    from omegaconf import OmegaConf

    from prunelab.evaluation.suite import perplexity_sets

    ev = OmegaConf.create({"perplexity": {"datasets": ["embedded:test"]}})
    assert perplexity_sets(ev, S.load_source_config("embedded")) == [("embedded", "test")]
    domain = S.load_source_config("embedded_domain")
    assert perplexity_sets(ev, domain) == [("embedded", "test"), ("embedded_domain", "test")]
    bad = S.load_source_config("embedded_domain")
    bad.in_domain_eval = "yes"
    with pytest.raises(ConfigError, match=re.escape("data.in_domain_eval='yes'")):
        S.build_source(bad)
    no_test = S.load_source_config("health_pubmedqa")
    no_test.in_domain_eval = True
    with pytest.raises(ConfigError, match="needs a test split"):
        S.build_source(no_test)


def test_stdlib_corpus_is_cached_on_disk_and_rebuilt_when_unreadable(tmp_path, monkeypatch):
    """The parse of the standard library is kept under $PRUNELAB_CACHE_DIR; a damaged cache
    file is parsed again, never trusted."""
    from prunelab.data import corpus

    monkeypatch.setenv("PRUNELAB_CACHE_DIR", str(tmp_path))
    first = corpus._stdlib_docs()
    (cached,) = (tmp_path / "corpus").glob("stdlib-*.json")
    assert corpus._stdlib_docs() == first  # read back: the same documents, in order
    calls = []
    parse = corpus._parse_stdlib
    monkeypatch.setattr(corpus, "_parse_stdlib", lambda files: calls.append(1) or parse(files))
    assert corpus._stdlib_docs() == first and calls == []  # from the file
    cached.write_text("{not json")
    assert corpus._stdlib_docs() == first and calls == [1]  # parsed again, file rewritten
    assert json.loads(cached.read_text())[0]["id"] == first[0].id


# ----------------------------------------------------------------------------- the protocol's joiner


def test_eval_joiner_is_the_protocols_not_the_datasets():
    """eval.perplexity.joiner replaces data.joiner for the evaluation: LLM-Pruner's code joins
    PTB sentences with "\\n\\n", GPTQ-style code (data=ptb's own joiner) with " "."""
    from prunelab.evaluation.suite import check_joiner, joiner_of, source_for

    data_cfg = S.load_source_config("ptb")
    data_cfg.local_files = {"validation": str(PTB_VAL)}
    rows = column(PTB_VAL, "sentence")
    assert source_for("ptb", data_cfg).text("validation") == " ".join(rows)
    assert source_for("ptb", data_cfg, "\n\n").text("validation") == "\n\n".join(rows)
    assert joiner_of(None, "ptb") is None and joiner_of("\n\n", "ptb") == "\n\n"
    assert joiner_of({"ptb": "\n\n"}, "ptb") == "\n\n" and joiner_of({"ptb": "\n\n"}, "wikitext2") is None
    check_joiner({"ptb": " "}, ["wikitext2", "ptb"])
    with pytest.raises(ConfigError, match=r"eval\.perplexity\.joiner names \['c4'\]"):
        check_joiner({"c4": " "}, ["wikitext2", "ptb"])
    with pytest.raises(ConfigError, match=r"eval\.perplexity\.joiner=3 is not allowed; allowed: null"):
        check_joiner(3, ["ptb"])


def test_eval_perplexity_uses_the_protocols_joiner(tokenizer, tmp_path):
    """The number itself: exp(mean NLL) over 16-token windows of BOS + "\\n\\n".join(rows),
    computed here by hand, differs from the " "-joined text's."""
    from omegaconf import OmegaConf

    from prunelab.evaluation.suite import evaluate
    from tests.conftest import make_model

    torch.manual_seed(0)
    model = make_model(
        "llama", kv=2, heads=2, layers=1, hidden=32, inter=64, vocab=len(tokenizer), max_pos=64
    )
    data_cfg = S.load_source_config("ptb")
    data_cfg.local_files = {"validation": str(PTB_VAL)}

    def ev(joiner):
        cfg = OmegaConf.create(
            {
                "perplexity": {
                    "datasets": ["ptb:validation"],
                    "seq_len": 16,
                    "batch_size": 4,
                    "max_windows": None,
                    "joiner": joiner,
                },
                "zeroshot": {"tasks": []},
                "cost": {"enabled": False},
            }
        )
        return evaluate(model, tokenizer, cfg, tmp_path, "test", data_cfg)["perplexity"]["ptb"]

    def by_hand(text):
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        n = len(ids) // 16
        windows = torch.tensor(ids[: n * 16]).view(n, 16)
        with torch.no_grad():
            logp = torch.log_softmax(model(windows).logits.double(), -1)
        nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
        return float(torch.exp(nll))

    rows = column(PTB_VAL, "sentence")
    blank, space = ev("\n\n"), ev(None)
    assert blank == pytest.approx(by_hand("\n\n".join(rows)), rel=1e-5)
    assert space == pytest.approx(by_hand(" ".join(rows)), rel=1e-5)
    assert abs(blank - space) > 1e-3
