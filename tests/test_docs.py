"""The Python examples in docs/USING.md run as written (those marked ``# needs: torchvision`` or
``# needs: timm`` where that package imports: CI's zoo stage)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from zoo_imports import import_zoo

USING = Path(__file__).resolve().parents[1] / "docs" / "USING.md"
BLOCKS = re.findall(r"```python\n(.*?)```", USING.read_text(), flags=re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, capsys):
    code = BLOCKS[index]
    needs = re.match(r"# needs: (\w+)", code)
    if needs:
        import_zoo(needs.group(1), module_level=False)
    exec(compile(code, f"{USING.name}[{index}]", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out.strip()  # every example prints what it shows
