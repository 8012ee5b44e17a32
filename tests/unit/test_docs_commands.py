"""Every ``prunelab …`` command shown in the README and docs/ is valid as written.

Each command (sweeps expanded job by job, as Hydra would) is composed and validated as a
dry run; on the embedded and synthetic models the plan is made too (config.json is local),
so a ratio the structure cannot meet fails here, not on a reader's machine. Hub models are
validated without their config.json (no download), as ``dry_run=true`` does.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from prunelab.api import compose
from prunelab.runner import validate

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `prunelab`) for each documented `prunelab` / `make run ARGS=` line."""
    out = []
    for doc in DOCS:
        for block in shell_blocks(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("make run ARGS="):
                    line = "prunelab " + shlex.split(line[len("make run ") :])[0].split("=", 1)[1]
                if not re.match(r"^prunelab(\s|$)", line):
                    continue
                argv = shlex.split(line, comments=True)[1:]
                out.append((f"{doc.relative_to(ROOT)}: {line[:90]}", argv))
        # inline commands in the prose: `prunelab method=… ratio=…` (placeholders left out)
        prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for span in re.findall(r"`(prunelab(?: [^`]*)?)`", prose.replace("\n", " ")):
            if any(c in span for c in "…<>{}|") or "..." in span:
                continue
            out.append((f"{doc.relative_to(ROOT)}: `{span[:90]}`", shlex.split(span)[1:]))
    return out


def jobs(argv: list[str]) -> list[list[str]]:
    """The overrides of each job the command runs (flags dropped, sweeps expanded)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-") and a not in ("job", "hydra", "all")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            choices.append([f"{o.get_key_element()}={v}" for v in values])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


CASES = commands()


def test_the_docs_show_commands():
    assert len(CASES) >= 30  # the README's and docs' command lines were found


@pytest.mark.parametrize("where,argv", CASES, ids=[c[0] for c in CASES])
def test_documented_command_is_valid(where, argv, tmp_path):
    for overrides in jobs(argv):
        if any(o.startswith("hydra/") or o.startswith("hydra.") for o in overrides):
            overrides = [o for o in overrides if not o.startswith(("hydra/", "hydra."))]
        cfg = compose([*overrides, f"output_root={tmp_path}"])
        local = str(cfg.model.path).startswith(("embedded:", "synthetic:"))
        validate(cfg, with_plan=local)  # raises ConfigError with the key, value and what is allowed
