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
import types
from pathlib import Path

import anyio
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


def test_some_pages_are_runnable() -> None:
    assert runnable_pages(), "no runnable blocks found in docs/"


@pytest.mark.anyio
@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(DOCS)))
async def test_docs_page_runs(page: Path, anyio_backend: tuple[str, dict[str, object]]) -> None:
    code, only = extract(page)
    if only and anyio_backend[0] not in only:
        pytest.skip(f"{page.name} is marked to run on {sorted(only)} only")
    compiled = compile(
        code, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    module = types.ModuleType(f"docs_{page.stem}")
    namespace = module.__dict__
    namespace["__name__"] = module.__name__
    result = eval(compiled, namespace)
    if isinstance(result, types.CoroutineType):
        await result
    await anyio.lowlevel.checkpoint()
