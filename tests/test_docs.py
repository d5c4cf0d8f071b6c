"""Every ```python block in README.md and docs/*.md runs, in order, per file: documentation cannot rot."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_docs_have_snippets():
    assert sum(len(BLOCK.findall(f.read_text())) for f in FILES) >= 10


@pytest.mark.parametrize("path", [f for f in FILES if BLOCK.search(f.read_text())], ids=lambda p: p.name)
def test_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(BLOCK.findall(path.read_text())):
        try:
            exec(compile(code, f"{path.name}[block {i + 1}]", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"{path.name}, python block {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e


def test_stack_page_runs_and_is_linked():
    """docs/stack.md ("Using a gated model in your stack") is one of the pages whose snippets run, and is linked."""
    stack = ROOT / "docs" / "stack.md"
    assert stack in FILES and len(BLOCK.findall(stack.read_text())) >= 6
    assert "(docs/stack.md)" in (ROOT / "README.md").read_text()
    assert "(stack.md)" in (ROOT / "docs" / "api.md").read_text()
