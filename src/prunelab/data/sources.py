"""Text sources: calibration, recovery and perplexity data behind one small interface.

A data config (``conf/data/<name>.yaml``) picks a source:

  - ``EmbeddedText``: the offline stdlib corpus (``prunelab.data.corpus``), the default;
  - ``HubText``: a Hugging Face dataset (wikitext2, ptb, c4, bookcorpus, alpaca_cleaned),
    loaded from the hub or, with ``local_files``, from local files in the hub's own format.

Every source gives the whole split as one string (``text``, rows joined the way the papers'
perplexity protocols join them), its token ids, random calibration windows and, for
instruction data, ``{instruction, input, output}`` examples (``instruction_examples``).

    python -m prunelab.data.sources wikitext2   # prints the resolved config and split sizes
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from prunelab.data.corpus import SOURCES, SPLITS, Document, documents
from prunelab.errors import ConfigError, bad_value, unknown_key
from prunelab.paths import conf_dir

# Names shipped in conf/data/; a user's own conf/data/<name>.yaml adds to them.
DATA_NAMES = ("embedded", "wikitext2", "ptb", "c4", "bookcorpus", "alpaca_cleaned")
SEPARATOR = "<|endoftext|>"  # = prunelab.models.embedded.SEPARATOR (not imported: keeps this import light)

# Local file suffix -> datasets builder; matches the formats the hub datasets ship in.
LOCAL_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".txt": "text",
}
TEXT_FORMATS = (None, "alpaca")

# The Stanford Alpaca prompt (also LLM-Pruner's recovery template).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
COMPLETE_INSTRUCTION = "Complete the passage."
DESCRIBE_INSTRUCTION = "What does this section describe?"
_MIN_WORDS = 12  # shorter paragraphs make degenerate instruction examples
_MAX_TITLE_CHARS = 200
_UNDERLINE = re.compile(r"[*=\-~^#+]{3,}")


@dataclass(frozen=True)
class Calibration:
    """How many windows of how many tokens from which split (explicit, never from the model)."""

    num_samples: int
    seq_len: int
    split: str = "train"


@runtime_checkable
class TextSource(Protocol):
    name: str
    calibration: Calibration

    def text(self, split: str) -> str: ...
    def token_ids(self, tokenizer: Any, split: str) -> torch.Tensor: ...
    def calibration_windows(
        self, tokenizer: Any, num_samples: int, seq_len: int, seed: int, split: str = "train"
    ) -> torch.Tensor: ...
    def instruction_examples(self, split: str = "train") -> list[dict[str, str]]: ...
    def check(self) -> None: ...


# ----------------------------------------------------------------------------- helpers


def plain(value: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (Hydra's instantiate hands us DictConfigs); the
    one conversion of config nodes below the CLI/API edge (methods and the evaluation use it too)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # omegaconf is a dependency, but keep plain dicts working without it
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _calibration(value: Any) -> Calibration:
    value = plain(value) or {}
    if isinstance(value, Calibration):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.calibration={value!r} must be a mapping {{num_samples, seq_len, split}}")
    fields = ("num_samples", "seq_len", "split")
    for key in value:
        if key not in fields:
            raise bad_value(f"data.calibration.{key}", key, fields)
    for key in ("num_samples", "seq_len"):
        v = value.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"data.calibration.{key}={v!r} must be a positive integer")
    split = value.get("split", "train")
    if split not in SPLITS:
        raise bad_value("data.calibration.split", split, SPLITS)
    return Calibration(value["num_samples"], value["seq_len"], split)


def _random_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError(f"num_samples={num_samples} and seq_len={seq_len} must be positive")
    n = ids.numel()
    # +1 so that every window has a next token to predict (the papers' sampling rule).
    if n < seq_len + 1:
        raise ValueError(
            f"{what} has {n} tokens, fewer than seq_len+1={seq_len + 1}: lower calibration.seq_len "
            "or use a larger split"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len, (num_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def alpaca_prompt(example: Mapping[str, str]) -> str:
    """The Alpaca prompt for an example, up to and including ``### Response:\\n``."""
    template = ALPACA_PROMPT_INPUT if (example.get("input") or "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=example.get("instruction") or "", input=example.get("input") or "")


def format_alpaca(example: Mapping[str, str]) -> str:
    """Prompt followed by the response: how an instruction example reads as plain text."""
    return alpaca_prompt(example) + (example.get("output") or "")


# ----------------------------------------------------------------------------- embedded corpus


def _paragraphs(doc: Document) -> tuple[list[str], str | None]:
    """Whitespace-normalised paragraphs of a document and its title-like line (or None)."""
    # Comment documents hold one paragraph per line; the others separate paragraphs by blank lines.
    raw = doc.text.split("\n") if doc.source == "comments" else re.split(r"\n\s*\n", doc.text)
    paras, heading = [], None
    for i, block in enumerate(raw):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        body = [ln for ln in lines if not _UNDERLINE.fullmatch(ln)]
        if i == 0 and len(body) < len(lines) and body:
            heading = " ".join(body)  # reST heading: "The import statement\n*********"
            continue
        if body:
            paras.append(" ".join(" ".join(body).split()))
    if heading is None and paras:
        heading = re.split(r"(?<=[.!?])\s+", paras[0], maxsplit=1)[0]
    if heading is not None and (len(heading) > _MAX_TITLE_CHARS or len(heading.split()) < 2):
        heading = None
    return paras, heading


def corpus_instruction_examples(docs: list[Document]) -> list[dict[str, str]]:
    """Instruction-style examples derived from corpus documents, deterministically.

    Paragraph 0 and even paragraphs become "Complete the passage." (first half of the words
    as input, the rest as output); odd paragraphs become "What does this section describe?"
    with the document's heading or first sentence as the answer.
    """
    examples = []
    for doc in docs:
        paras, title = _paragraphs(doc)
        for j, para in enumerate(paras):
            words = para.split()
            if len(words) < _MIN_WORDS:
                continue
            if j % 2 == 1 and title is not None and title not in para:
                examples.append({"instruction": DESCRIBE_INSTRUCTION, "input": para, "output": title})
            else:
                cut = len(words) // 2
                examples.append(
                    {
                        "instruction": COMPLETE_INSTRUCTION,
                        "input": " ".join(words[:cut]),
                        "output": " ".join(words[cut:]),
                    }
                )
    return examples


class EmbeddedText:
    """The offline stdlib corpus; documents are joined by the ``<|endoftext|>`` separator."""

    def __init__(
        self,
        name: str = "embedded",
        sources: list[str] | tuple[str, ...] | None = None,
        calibration: Mapping[str, Any] | Calibration | None = None,
    ) -> None:
        self.name = name
        sources = plain(sources)
        if sources is not None:
            if isinstance(sources, str) or not isinstance(sources, (list, tuple)):
                raise ConfigError(f"data.sources={sources!r} must be null or a list of {list(SOURCES)}")
            for s in sources:
                if s not in SOURCES:
                    raise bad_value("data.sources", s, SOURCES)
            sources = tuple(sources)
        self.sources: tuple[str, ...] | None = sources
        self.calibration = _calibration(calibration or {"num_samples": 16, "seq_len": 128, "split": "train"})
        self._texts: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"EmbeddedText(name={self.name!r}, sources={self.sources!r})"

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise bad_value("split", split, SPLITS)
        return split

    def text(self, split: str) -> str:
        split = self._split(split)
        if split not in self._texts:
            self._texts[split] = SEPARATOR.join(d.text for d in documents(split, self.sources))
        return self._texts[split]

    def token_ids(self, tokenizer: Any, split: str) -> torch.Tensor:
        from prunelab.models.embedded import token_stream

        return token_stream(tokenizer, self._split(split), self.sources)

    def calibration_windows(
        self, tokenizer: Any, num_samples: int, seq_len: int, seed: int, split: str = "train"
    ) -> torch.Tensor:
        ids = self.token_ids(tokenizer, split)
        return _random_windows(ids, num_samples, seq_len, seed, f"data {self.name!r} split {split!r}")

    def instruction_examples(self, split: str = "train") -> list[dict[str, str]]:
        return corpus_instruction_examples(documents(self._split(split), self.sources))

    def check(self) -> None:
        return None  # built from the running Python's stdlib: nothing to find on disk


# ----------------------------------------------------------------------------- hub datasets


def _local_builder(path: str) -> str | None:
    lower = path.lower()
    for suffix in sorted(LOCAL_BUILDERS, key=len, reverse=True):  # ".json.gz" before ".gz"-less ".json"
        if lower.endswith(suffix):
            return LOCAL_BUILDERS[suffix]
    return None


_EXPECTED_LOCAL = "an existing " + ", ".join(LOCAL_BUILDERS) + " file in the hub dataset's format"


class HubText:
    """A Hugging Face dataset, from the hub or from ``local_files`` in the same format."""

    def __init__(
        self,
        name: str,
        path: str,
        config_name: str | None = None,
        text_field: str | None = "text",
        joiner: str = "\n\n",
        splits: Mapping[str, str] | None = None,
        data_files: str | list[str] | Mapping[str, str | list[str]] | None = None,
        local_files: Mapping[str, str] | None = None,
        calibration: Mapping[str, Any] | Calibration | None = None,
        text_format: str | None = None,
        max_rows: int | Mapping[str, int | None] | None = None,
        revision: str | None = None,
    ) -> None:
        self.name = name
        if revision is not None and (not isinstance(revision, str) or not revision):
            raise ConfigError(f"data.revision={revision!r} must be a branch, tag or commit sha of {path!r}")
        self.revision = revision
        if not isinstance(path, str) or not path or path.count("/") != 1:
            # huggingface_hub >= 1 refuses un-namespaced ids ("wikitext"): say so before loading
            raise ConfigError(
                f"data.path={path!r} must be a namespaced hub dataset id 'namespace/name' such as "
                "'Salesforce/wikitext'"
            )
        self.path = path
        self.config_name = config_name
        if text_format not in TEXT_FORMATS:
            raise bad_value("data.text_format", text_format, TEXT_FORMATS)
        self.text_format = text_format
        if text_format is None and not isinstance(text_field, str):
            raise ConfigError(f"data.text_field={text_field!r} must name the dataset's text column")
        self.text_field = text_field
        if not isinstance(joiner, str):
            raise ConfigError(f"data.joiner={joiner!r} must be a string")
        self.joiner = joiner
        splits = dict(plain(splits) or {s: s for s in SPLITS})
        for key in splits:
            if key not in SPLITS:
                raise unknown_key("data.splits", key, SPLITS)
        self.splits: dict[str, str] = splits
        self.data_files = plain(data_files)
        local_files = dict(plain(local_files) or {})
        for key in local_files:
            if key not in splits:
                raise unknown_key("data.local_files", key, list(splits))
        self.local_files: dict[str, str] = local_files
        max_rows = plain(max_rows)
        if isinstance(max_rows, Mapping):
            for key in max_rows:
                if key not in splits:
                    raise unknown_key("data.max_rows", key, list(splits))
        elif max_rows is not None and (not isinstance(max_rows, int) or max_rows <= 0):
            raise ConfigError(f"data.max_rows={max_rows!r} must be null, a positive int or {{split: int}}")
        self.max_rows = max_rows
        self.calibration = _calibration(
            calibration or {"num_samples": 128, "seq_len": 2048, "split": "train"}
        )
        self._datasets: dict[str, Any] = {}
        self._texts: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"HubText(name={self.name!r}, path={self.path!r}, config_name={self.config_name!r})"

    def _hub_split(self, split: str) -> str:
        if split not in self.splits:
            raise ConfigError(
                f"data {self.name!r} has no split {split!r}; data.splits maps only {', '.join(self.splits)}"
            )
        return self.splits[split]

    def check(self) -> None:
        for split, file in self.local_files.items():
            key = f"data.local_files.{split}"
            if not isinstance(file, str) or _local_builder(file) is None:
                raise ConfigError(f"{key}={file!r} has an unknown format; expected {_EXPECTED_LOCAL}")
            if not Path(file).expanduser().is_file():
                raise ConfigError(f"{key}={file!r} does not exist; expected {_EXPECTED_LOCAL}")

    def _dataset(self, split: str) -> Any:
        """The split's rows as a ``datasets.Dataset`` (cached per split)."""
        hub_split = self._hub_split(split)
        if split in self._datasets:
            return self._datasets[split]
        import datasets

        if split in self.local_files:
            self.check()
            file = str(Path(self.local_files[split]).expanduser())
            ds = datasets.load_dataset(_local_builder(file), data_files=file, split="train")
        else:
            data_files = self.data_files
            if isinstance(data_files, Mapping):
                # Only this split's shards: c4's train shard alone is hundreds of MB.
                if hub_split not in data_files:
                    raise bad_value(f"data.data_files (split {split!r})", hub_split, list(data_files))
                data_files = {hub_split: data_files[hub_split]}
            # No trust_remote_code: dataset scripts are code from the internet.
            ds = datasets.load_dataset(
                self.path, self.config_name, split=hub_split, data_files=data_files, revision=self.revision
            )
        limit = self.max_rows.get(split) if isinstance(self.max_rows, Mapping) else self.max_rows
        if limit is not None and len(ds) > limit:
            ds = ds.select(range(limit))
        self._datasets[split] = ds
        return ds

    def _column(self, ds: Any, field: str, split: str) -> list[str]:
        if field not in ds.column_names:
            # datasets' text builder names its only column "text" (e.g. PTB's ptb.train.txt).
            if ds.column_names == ["text"]:
                field = "text"
            else:
                raise ConfigError(
                    f"data.text_field={field!r} is not a column of data {self.name!r} split {split!r}; "
                    f"columns: {', '.join(ds.column_names)}"
                )
        return ["" if v is None else str(v) for v in ds[field]]

    def instruction_examples(self, split: str = "train") -> list[dict[str, str]]:
        ds = self._dataset(split)
        missing = [f for f in ("instruction", "input", "output") if f not in ds.column_names]
        if missing:
            raise ConfigError(
                f"data {self.name!r} has no instruction data (missing columns {missing}); "
                "use data=alpaca_cleaned or data=embedded"
            )
        cols = {f: self._column(ds, f, split) for f in ("instruction", "input", "output")}
        return [
            {"instruction": i, "input": x, "output": o}
            for i, x, o in zip(cols["instruction"], cols["input"], cols["output"], strict=True)
        ]

    def text(self, split: str) -> str:
        if split not in self._texts:
            if self.text_format == "alpaca":
                rows = [format_alpaca(ex) for ex in self.instruction_examples(split)]
            else:
                rows = self._column(self._dataset(split), self.text_field, split)
            self._texts[split] = self.joiner.join(rows)
        return self._texts[split]

    def token_ids(self, tokenizer: Any, split: str) -> torch.Tensor:
        # One call on the joined text, as the papers do (per-row calls would add a prefix space
        # per row with SentencePiece tokenizers). verbose=False: the "longer than max length"
        # warning is expected here.
        ids = tokenizer(self.text(split), add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        return torch.tensor(ids, dtype=torch.long)

    def calibration_windows(
        self, tokenizer: Any, num_samples: int, seq_len: int, seed: int, split: str = "train"
    ) -> torch.Tensor:
        ids = self.token_ids(tokenizer, split)
        return _random_windows(ids, num_samples, seq_len, seed, f"data {self.name!r} split {split!r}")


# ----------------------------------------------------------------------------- building

_MODULE = "prunelab.data.sources"  # not __name__, which is "__main__" under python -m
_CLASSES: dict[str, type] = {"EmbeddedText": EmbeddedText, "HubText": HubText}
_KEYS = {
    "EmbeddedText": ("name", "_target_", "sources", "calibration", "in_domain_eval"),
    "HubText": (
        "name",
        "_target_",
        "path",
        "config_name",
        "text_field",
        "joiner",
        "splits",
        "data_files",
        "local_files",
        "calibration",
        "text_format",
        "max_rows",
        "in_domain_eval",
        "revision",
    ),
}


def available_names() -> list[str]:
    """Shipped data names plus any extra ``conf/data/*.yaml``."""
    extra = sorted(p.stem for p in (conf_dir() / "data").glob("*.yaml") if p.stem not in DATA_NAMES)
    return [*DATA_NAMES, *extra]


def load_source_config(name: str) -> Any:
    """``conf/data/<name>.yaml`` as a DictConfig."""
    from omegaconf import OmegaConf

    path = conf_dir() / "data" / f"{name}.yaml"
    if not path.is_file():
        raise bad_value("data", name, available_names())
    return OmegaConf.load(path)


def build_source(cfg: Any) -> TextSource:
    """A source from a data config node (``cfg.data``); validates keys and values, loads nothing."""
    cfg = plain(cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"data={cfg!r} must be a mapping (a conf/data/*.yaml node)")
    cfg = dict(cfg)
    name = cfg.get("name")
    allowed = available_names()
    if name not in allowed:
        raise bad_value("data.name", name, allowed)
    target = cfg.get("_target_") or ("EmbeddedText" if name == "embedded" else "HubText")
    short = target.rsplit(".", 1)[-1]
    if short not in _CLASSES or target not in (short, f"{_MODULE}.{short}"):
        raise bad_value("data._target_", target, [f"{_MODULE}.{c}" for c in _CLASSES])
    for key in cfg:
        if key not in _KEYS[short]:
            close = difflib.get_close_matches(str(key), _KEYS[short], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            raise ConfigError(
                f"data.{key} is not a key of data={name}{hint} allowed: {', '.join(sorted(_KEYS[short]))}"
            )
    # in_domain_eval (a domain dataset: runs also report perplexity on its test split) is read
    # by the evaluation, not by the source
    if not isinstance(cfg.get("in_domain_eval", False), bool):
        raise ConfigError(f"data.in_domain_eval={cfg['in_domain_eval']!r} must be true or false")
    if cfg.get("in_domain_eval") and "test" not in (cfg.get("splits") or {"test": "test"}):
        raise ConfigError(
            f"data.in_domain_eval=true needs a test split; data {name!r} maps only {', '.join(cfg['splits'])}"
        )
    kwargs = {k: v for k, v in cfg.items() if k not in ("_target_", "in_domain_eval")}
    return _CLASSES[short](**kwargs)


def instruction_examples(cfg: Any, split: str = "train") -> list[dict[str, str]]:
    """``{instruction, input, output}`` examples of a data config (or of a built source)."""
    source = cfg if isinstance(cfg, (EmbeddedText, HubText)) else build_source(cfg)
    return source.instruction_examples(split)


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    names = (argv if argv is not None else sys.argv[1:]) or ["embedded"]
    for name in names:
        cfg = load_source_config(name)
        print(OmegaConf.to_yaml(cfg))
        source = build_source(cfg)
        source.check()
        if isinstance(source, HubText) and os.environ.get("HF_HUB_OFFLINE") == "1" and not source.local_files:
            print("(offline and no local_files: not loading)")
            continue
        for split in SPLITS:
            try:
                print(f"{name} {split:10s} chars={len(source.text(split)):10d}")
            except ConfigError as e:
                print(f"{name} {split:10s} -- {e}")


if __name__ == "__main__":
    main()
