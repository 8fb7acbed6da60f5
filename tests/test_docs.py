"""The Python examples in docs/USING.md and docs/DEPLOY.md run as written (those marked ``# needs: torchvision``
or ``# needs: timm`` where that package imports: CI's zoo stage)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from zoo_imports import import_zoo

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [
    (page, code)
    for page in ("USING.md", "DEPLOY.md")
    for code in re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
]


def test_the_pages_have_examples():
    assert sum(page == "USING.md" for page, _ in BLOCKS) >= 5 and any(page == "DEPLOY.md" for page, _ in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, capsys):
    page, code = BLOCKS[index]
    needs = re.match(r"# needs: (\w+)", code)
    if needs:
        import_zoo(needs.group(1), module_level=False)
    exec(compile(code, f"{page}[{index}]", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out.strip()  # every example prints what it shows
