"""Offline corpus built at run time from text every CPython install carries.

Three sources, kept apart so later methods can mix them:
  - ``reference``: the language reference / library topics (``pydoc_data.topics``),
  - ``docstrings``: module, class and function docstrings of the standard library,
  - ``comments``: paragraphs of ``#`` comments in the standard library.

Each document has a stable id (e.g. ``docstrings:json/decoder.py``); its split is a hash of
that id, so a document lands in the same split on every Python version even though the
text itself differs slightly between versions. The test split is never trained on.

    python -m prunelab.data.corpus   # prints sizes per source and split
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SOURCES = ("reference", "docstrings", "comments")
SPLITS = ("train", "validation", "test")
# Fractions of documents (by id hash) per split.
SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}
# Parts of the stdlib that are test suites, GUI code or vendored grammars: not prose.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "pydoc_data",
}
_MIN_CHARS = 40


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.id)


def split_of(doc_id: str) -> str:
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    if h < SPLIT_FRACTIONS["train"]:
        return "train"
    if h < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "test"


def _clean_prose(text: str) -> str:
    """Drop doctest and indented code lines, collapse runs of blank lines."""
    out: list[str] = []
    for line in text.splitlines():
        s = line.rstrip()
        if s.lstrip().startswith((">>>", "...")) or (s.startswith((" ", "\t")) and s.strip()):
            continue
        out.append(s)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _reference_docs() -> list[Document]:
    import pydoc_data.topics as topics

    docs = []
    for key in sorted(topics.topics):
        text = _clean_prose(topics.topics[key])
        if len(text) >= _MIN_CHARS:
            docs.append(Document(f"reference:{key}", "reference", text))
    return docs


def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                files.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return files


def _comment_paragraphs(source: str) -> list[str]:
    paras, cur = [], []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            body = s.lstrip("#").strip()
            if body and not re.match(r"(?i)(copyright|license|-\*-|type:|noqa|pragma|XXX$)", body):
                cur.append(body)
                continue
        if cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    # Keep only paragraphs that read like prose (mostly letters and spaces).
    return [
        p for p in paras if len(p) >= _MIN_CHARS and sum(c.isalpha() or c == " " for c in p) > 0.8 * len(p)
    ]


def cache_root() -> Path:
    """prunelab's per-user cache (``$PRUNELAB_CACHE_DIR``, default ``~/.cache/prunelab``)."""
    return Path(os.environ.get("PRUNELAB_CACHE_DIR", Path.home() / ".cache" / "prunelab"))


def _stdlib_docs() -> list[Document]:
    """The docstring and comment documents of the standard library. Parsing ~700 files
    takes ~7 s, paid once per process by every run, test and benchmark job before this
    cache: the result is kept on disk under a key of the Python version, every file's
    size and mtime, and this module's own source (a change to the rules rebuilds it)."""
    files = _stdlib_files()
    key = hashlib.sha256(
        repr(
            (
                sys.version,
                Path(__file__).read_bytes(),
                [(rel, os.stat(path).st_size, os.stat(path).st_mtime_ns) for rel, path in files],
            )
        ).encode()
    ).hexdigest()[:20]
    cached = cache_root() / "corpus" / f"stdlib-{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return [Document(d["id"], d["source"], d["text"]) for d in json.loads(cached.read_text())]
    docs = _parse_stdlib(files)
    with contextlib.suppress(OSError):  # a read-only home only costs the parse
        cached.parent.mkdir(parents=True, exist_ok=True)
        from prunelab.tracking.rundir import unique_tmp

        tmp = unique_tmp(cached)  # per process and thread
        tmp.write_text(json.dumps([{"id": d.id, "source": d.source, "text": d.text} for d in docs]))
        os.replace(tmp, cached)
    return docs


def _parse_stdlib(files: list[tuple[str, str]]) -> list[Document]:
    docs = []
    for rel, path in files:
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    doc = _clean_prose(doc)
                    if len(doc) >= _MIN_CHARS:
                        parts.append(doc)
        if parts:
            docs.append(Document(f"docstrings:{rel}", "docstrings", "\n\n".join(parts)))
        comments = _comment_paragraphs(src)
        if comments:
            docs.append(Document(f"comments:{rel}", "comments", "\n".join(comments)))
    return docs


@lru_cache(maxsize=1)
def load_corpus() -> tuple[Document, ...]:
    """All documents, in a deterministic order."""
    return tuple(_reference_docs() + _stdlib_docs())


def documents(split: str, sources: tuple[str, ...] | None = None) -> list[Document]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    bad = [s for s in sources or () if s not in SOURCES]
    if bad:
        raise ValueError(f"sources={bad} not in {SOURCES}")
    return [d for d in load_corpus() if d.split == split and (sources is None or d.source in sources)]


def corpus_hash() -> str:
    h = hashlib.sha256()
    for d in load_corpus():
        h.update(d.id.encode())
        h.update(d.text.encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    for split in SPLITS:
        for source in SOURCES:
            docs = documents(split, (source,))
            print(f"{split:10s} {source:10s} docs={len(docs):5d} chars={sum(len(d.text) for d in docs):9d}")
    print("hash", corpus_hash())
