"""README.md and docs/ stay true: what they link or name exists, and the README keeps its promised shape."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Repository paths written in backticks, e.g. `docs/demo.md`, `scripts/demo.sh`, `configs/train/x.yaml`.
NAMED_PATH = re.compile(r"`((?:docs|scripts|configs|bench|assets|skingen)/[\w./-]+\.(?:md|sh|py|yaml|png|json))`")


def local_links(markdown: Path) -> list[str]:
    targets = [target.split("#", 1)[0] for target in LINK.findall(markdown.read_text(encoding="utf-8"))]
    return [target for target in targets if target and "://" not in target and not target.startswith("mailto:")]


@pytest.mark.parametrize("markdown", [README, *DOCS], ids=lambda path: path.name)
def test_every_local_link_and_picture_exists(markdown):
    missing = [target for target in local_links(markdown) if not (markdown.parent / target).exists()]
    assert not missing, f"{markdown.name} links to missing files: {missing}"


def test_every_repository_path_the_readme_names_exists():
    named = set(NAMED_PATH.findall(README.read_text(encoding="utf-8")))
    assert named, "the README names no repository path (the pattern no longer matches its style)"
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"README.md names missing files: {missing}"


def test_readme_starts_with_the_two_commands_and_shows_the_demo_grid():
    text = README.read_text(encoding="utf-8")
    assert len(text) < 12_000, f"README.md is {len(text)} characters; keep it under 12,000 (details go to docs/)"
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines() if line.split("#", 1)[0].strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    pictures = [target for target in local_links(README) if target.endswith(".png")]
    assert pictures, "the README shows the demo grid as a picture"
    with Image.open(README.parent / pictures[0]) as picture:
        assert picture.width >= 512 and picture.height >= 256
