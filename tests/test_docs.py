"""Every Python block of README.md and docs/ runs as pasted: a complete program.

Each ```python (or ```py / ```python3) block is written to a file and run in a
fresh interpreter, from the checkout, with a time limit: it must exit 0 by itself
(a server example starts, serves one request and stops). A block whose fence is
preceded by the line ``<!-- fragment -->`` (a signature, a sketch) is not run; at
most 15% of the blocks may be fragments.

A block that talks to Redis or PostgreSQL (it names ``redis://`` / ``:6379``,
``postgresql://`` / ``:5432``, or the ``PARALLELKIT_TEST_*_URL`` / ``CRM_REDIS_URL``
/ ``DATABASE_URL`` variables it must read its URL from) carries the ``redis`` /
``postgres`` marker: it gets the test servers' URLs in those variables, skips with
a reason locally when the server is down and fails under ``CI=true``. Other blocks
run with those variables removed, so they cannot reach a server by accident.

One test per block (``test_block_runs[docs/page.md:LINE]``), so a broken page
shows up as its own failures. Every block is marked ``slow`` (an interpreter each).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import parallelkit

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LIMIT_S = float(os.environ.get("DOC_BLOCK_S", "90"))
MAX_FRAGMENTS = 0.15

FENCE = re.compile(r"^(?P<indent>\s*)```(?:python|py|python3)\b[^\n]*$")
FRAGMENT = "<!-- fragment -->"
NEEDS = {
    "redis": re.compile(r"redis://|:6379\b|PARALLELKIT_TEST_REDIS_URL|CRM_REDIS_URL"),
    "postgres": re.compile(
        r"postgres(?:ql)?(?:\+\w+)?://|:5432\b|PARALLELKIT_TEST_PG_URL|DATABASE_URL"
    ),
}
SERVICE_VARS = {
    "redis": ("PARALLELKIT_TEST_REDIS_URL", "CRM_REDIS_URL"),
    "postgres": ("PARALLELKIT_TEST_PG_URL", "DATABASE_URL"),
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the first line of code
    code: str
    fragment: bool

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(name for name, pattern in NEEDS.items() if pattern.search(self.code))


def blocks_of(page: Path) -> list[Block]:
    """The Python blocks of a Markdown page, dedented as a reader would copy them."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent = len(match["indent"])
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            line = lines[i]
            body.append(line[indent:] if line[:indent].isspace() else line)
            i += 1
        start = i - len(body) + 1
        found.append(Block(page, start, "\n".join(body) + "\n", previous.lower() == FRAGMENT))
        i += 1
    return found


ALL = [block for page in PAGES if page.exists() for block in blocks_of(page)]


def _params() -> list[object]:
    params = []
    for block in ALL:
        if block.fragment:
            continue
        marks = [pytest.mark.slow, *(getattr(pytest.mark, need) for need in block.needs)]
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


def run_block(block: Block, env: dict[str, str], tmp: Path, limit: float = LIMIT_S) -> str | None:
    """Run one block as a program; ``None`` if it exited 0, else why it failed."""
    script = tmp / "block.py"
    script.write_text(block.code, encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return f"still running after {limit:g} s (a block must stop by itself)\n{err[-2000:]}"
    if process.returncode != 0:
        return f"exit {process.returncode}\n{out[-1500:]}\n{err[-3000:]}"
    return None


def _env(request: pytest.FixtureRequest, block: Block) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    for name, variables in SERVICE_VARS.items():
        for variable in variables:
            env.pop(variable, None)
        if name in block.needs:
            url = request.getfixturevalue("redis_url" if name == "redis" else "pg_url")
            env.update(dict.fromkeys(variables, url))
    return env


@pytest.mark.parametrize("block", _params())
def test_block_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    failure = run_block(block, _env(request, block), tmp_path)
    if failure is not None:
        pytest.fail(f"{block.id} does not run as pasted: {failure}", pytrace=False)


# -- the rules themselves ---------------------------------------------------------------------
def test_there_are_blocks_and_few_fragments() -> None:
    assert len(ALL) > 50, "README.md and docs/ should hold the examples"
    fragments = [b.id for b in ALL if b.fragment]
    assert len(fragments) <= MAX_FRAGMENTS * len(ALL), (
        f"{len(fragments)} of {len(ALL)} blocks are fragments (at most {MAX_FRAGMENTS:.0%}): "
        f"{fragments}"
    )


def test_extraction(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nimport anyio\n```\n\n<!-- fragment -->\n\n```py\ndef f(x, /): ...\n```\n"
        "* item\n\n    ```python3\n    x = 1\n    if x:\n        print(x)\n    ```\n"
        "```bash\nnot python\n```\n```python\nr = redis.from_url('redis://127.0.0.1:6379/0')\n```\n"
    )
    blocks = blocks_of(page)
    assert [(b.line, b.fragment) for b in blocks] == [
        (3, False),
        (9, True),
        (14, False),
        (22, False),
    ]
    assert blocks[0].code == "import anyio\n"
    assert blocks[2].code == "x = 1\nif x:\n    print(x)\n"  # dedented as copied
    assert [b.needs for b in blocks] == [(), (), (), ("redis",)]


def test_service_blocks_are_detected() -> None:
    def needs(code: str) -> tuple[str, ...]:
        return Block(ROOT / "x.md", 1, code, False).needs

    assert needs('os.environ.get("PARALLELKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")') == (
        "redis",
    )
    assert needs('url = os.environ["DATABASE_URL"]') == ("postgres",)
    assert needs(
        "engine = create_async_engine('postgresql+asyncpg://postgres@127.0.0.1/test')"
    ) == ("postgres",)
    assert needs("import anyio\nanyio.run(main)") == ()


def test_a_failing_block_fails(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    broken = Block(tmp_path / "p.md", 1, "value = 1 / 0\n", False)
    failure = run_block(broken, env, tmp_path)
    assert failure is not None
    assert "ZeroDivisionError" in failure


def test_a_block_that_does_not_stop_fails(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hanging = Block(tmp_path / "p.md", 1, "import time\ntime.sleep(60)\n", False)
    failure = run_block(hanging, env, tmp_path, limit=0.5)
    assert failure is not None
    assert "still running" in failure


def test_unmarked_blocks_get_no_server_urls(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://somewhere/db")
    monkeypatch.setenv("PARALLELKIT_TEST_REDIS_URL", "redis://somewhere/0")
    env = _env(request, Block(ROOT / "x.md", 1, "import anyio\n", False))
    assert not {v for vs in SERVICE_VARS.values() for v in vs} & set(env)


# -- the API reference ---------------------------------------------------------------------------
REFERENCE = ROOT / "docs" / "reference"


def public_modules() -> list[str]:
    """``parallelkit`` and each public module or subpackage under it (otel once it exists)."""
    found = [
        f"parallelkit.{info.name}"
        for info in pkgutil.iter_modules(parallelkit.__path__)
        if not info.name.startswith("_")
    ]
    return ["parallelkit", *sorted(found)]


def public_names(module_name: str) -> list[str]:
    """``__all__``; for the pytest plugin (no ``__all__``), the fixtures it defines."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith(("_", "pytest_"))  # hooks are pytest's, not ours to document
        and getattr(obj, "__module__", None) == module_name
    ]


def test_every_public_module_has_a_reference_page() -> None:
    directives = {
        line.split()[1]
        for page in REFERENCE.glob("*.md")
        for line in page.read_text().splitlines()
        if line.startswith("::: ")
    }
    missing = [m for m in public_modules() if m not in directives]
    assert not missing, f"no reference page renders {missing} (add docs/reference/<name>.md)"


@pytest.mark.slow
def test_the_reference_documents_every_public_name(tmp_path: Path) -> None:
    """Build the reference pages with mkdocstrings; every public name must have its entry."""
    docs = tmp_path / "docs"
    (docs / "reference").mkdir(parents=True)
    for page in REFERENCE.glob("*.md"):
        (docs / "reference" / page.name).write_text(page.read_text())
    (docs / "index.md").write_text("# index\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        "site_name: reference\n"
        "plugins:\n"
        "  - mkdocstrings:\n"
        "      handlers:\n"
        "        python:\n"
        f"          paths: [{ROOT / 'src'}]\n"
        "          options: {docstring_style: google, show_source: false, "
        "show_root_heading: true, members_order: source}\n"
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "-q",
            "-f",
            str(config),
            "-d",
            str(tmp_path / "site"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    html = "".join(p.read_text() for p in (tmp_path / "site" / "reference").rglob("*.html"))
    anchors = set(re.findall(r'id="(parallelkit[\w.]*)"', html))
    missing = [
        f"{module}.{name}"
        for module in public_modules()
        for name in public_names(module)
        if f"{module}.{name}" not in anchors
        and f"{module}.{name}" not in public_modules()  # a submodule: its own page
    ]
    assert not missing, f"public names with no entry in docs/reference/: {missing}"
    for name in ("CapturedQuery", "EagerPath", "Strategy"):
        assert f"parallelkit.sqlalchemy.{name}" in anchors


# -- the README's two commands --------------------------------------------------------------------
def _bash_blocks(page: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


def test_the_readme_gives_the_main_job_and_the_test_command_ci_runs() -> None:
    main_job, tests = (b.strip() for b in _bash_blocks(ROOT / "README.md")[:2])
    assert main_job.endswith("python -m examples.crm && python -m benchmarks")
    assert "--database" not in main_job  # embedded SQLite
    assert "--redis" not in main_job  # and no server
    assert tests.endswith('pip install -e ".[dev]" && python -m pytest')
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip" install -q -e ".[dev]"' in ci
    assert "\npython -m pytest\n" in ci
