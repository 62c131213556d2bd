"""One start-up model: the docs, the example and the benchmark show the same one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from benchmarks import bench_startup
from examples.crm import startup

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/orchestrator.md", "docs/recipes/server-startup.md"]


def test_the_model_reproduces_the_seed_log() -> None:
    ready = startup.expected_ready()
    assert {name: round(ready[name] * 1000) for name in startup.SEED_LOG} == startup.SEED_LOG
    assert startup.critical_path() == pytest.approx(0.700)
    assert sum(startup.SEED_DURATIONS.values()) == pytest.approx(2.0)  # the seed's "sequential"


@pytest.mark.parametrize("page", PAGES)
def test_docs_show_the_model(page: str) -> None:
    text = (ROOT / page).read_text()
    found = re.search(r"^PLAYBOOK = (\{.*?^\})", text, re.MULTILINE | re.DOTALL)
    assert found, f"{page} does not show the start-up model (PLAYBOOK = {{...}})"
    shown = ast.literal_eval(found.group(1))
    model = {
        name: (seconds, startup.DEPENDS.get(name, ()))
        for name, seconds in startup.SEED_DURATIONS.items()
    }
    assert shown == model


def test_the_benchmark_uses_the_model() -> None:
    assert bench_startup.startup is startup
    orch = startup.build_orchestrator(1.0, port=0)
    assert set(orch.services) == set(startup.SEED_DURATIONS)
    needs = {
        n: tuple(d for d in s.depends_on if d in orch.services) for n, s in orch.services.items()
    }
    assert {n: deps for n, deps in needs.items() if deps} == dict(startup.DEPENDS)
