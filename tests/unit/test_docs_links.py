"""Links between the docs: every `page.md#anchor` names a heading that page has (GitHub's
anchor rule), so a renamed results heading cannot leave dead links behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]*\.md)?#([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no headings in code
    return {anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_anchor_rule_on_known_headings():
    assert anchor("What holds on a real model, beside the embedded model's answer") == (
        "what-holds-on-a-real-model-beside-the-embedded-models-answer"
    )
    assert anchor("LoRAPrune vs LLM-Pruner + LoRA (`x --ratios 0.2 0.5`)") == (
        "loraprune-vs-llm-pruner--lora-x---ratios-02-05"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_link_names_a_heading(page):
    dead = []
    for target, frag in LINK.findall(page.read_text()):
        dest = (page.parent / target).resolve() if target else page
        if dest.exists() and frag not in anchors(dest):
            dead.append(f"{target or page.name}#{frag}")
    assert not dead, f"{page.relative_to(ROOT)} links to headings that do not exist: {dead}"
