"""Execute every runnable code block in the docs, on asyncio and on trio.

A code block is runnable when the line right before its opening fence is
``<!-- run -->``. All runnable blocks of one page run in order, in one namespace
(later blocks may use what earlier ones defined), as one program that may use
top-level ``await``. ``<!-- run: asyncio -->`` restricts a page to one backend
(for recipes that use asyncio-only libraries). A broken recipe fails CI.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(
    r"^<!-- run(?::\s*(?P<only>\w+))? -->\s*\n```(?:python|py)[^\n]*\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)


def runnable_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if FENCE.search(p.read_text()))


def extract(page: Path) -> tuple[str, set[str]]:
    blocks, only = [], set()
    for match in FENCE.finditer(page.read_text()):
        blocks.append(match["code"])
        if match["only"]:
            only.add(match["only"])
    return "\n".join(blocks), only


def cases() -> list[tuple[Path, str]]:
    out = []
    for page in runnable_pages():
        _, only = extract(page)
        out += [(page, backend) for backend in ("asyncio", "trio") if not only or backend in only]
    return out


def test_some_pages_are_runnable() -> None:
    assert runnable_pages(), "no runnable blocks found in docs/"


def test_extractor_finds_marked_blocks_only(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "<!-- run -->\n```python\nx = 1\n```\n\n```python\nnot run\n```\n"
        "<!-- run: asyncio -->\n```python\ny = x + 1\n```\n"
    )
    code, only = extract(page)
    assert "x = 1" in code
    assert "y = x + 1" in code
    assert "not run" not in code
    assert only == {"asyncio"}


@pytest.mark.anyio
async def test_a_broken_block_fails() -> None:
    with pytest.raises(ZeroDivisionError):
        await run_code("value = 1 / 0", "broken.md")


async def run_code(code: str, name: str) -> None:
    compiled = compile(code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    module = types.ModuleType(f"docs_{Path(name).stem.replace('-', '_')}")
    sys.modules[module.__name__] = module  # dataclasses and pickling look modules up
    try:
        result = eval(compiled, module.__dict__)
        if isinstance(result, types.CoroutineType):
            await result
    finally:
        del sys.modules[module.__name__]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("page", "anyio_backend"),
    cases(),
    ids=[f"{p.relative_to(DOCS)}-{b}" for p, b in cases()],
)
async def test_docs_page_runs(page: Path, anyio_backend: str) -> None:
    code, _ = extract(page)
    await run_code(code, str(page))
