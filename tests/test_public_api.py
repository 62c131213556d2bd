"""The public surface matches DESIGN.md: names, signatures, module hygiene."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import parallelkit as pk

CONTRACT_NAMES = [
    "gather",
    "map",
    "imap",
    "Limiter",
    "Retry",
    "Outcome",
    "Flow",
    "SWRCache",
    "BatchLoader",
    "Orchestrator",
    "Timeline",
    "ParallelkitError",
    "CycleError",
    "StartupError",
    "probes",
]


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract_names_are_exported(name: str) -> None:
    assert hasattr(pk, name), f"parallelkit.{name} is part of the contract"
    if name != "probes":
        assert name in pk.__all__


def test_all_is_sorted_and_complete() -> None:
    assert list(pk.__all__) == sorted(pk.__all__)
    for name in pk.__all__:
        assert hasattr(pk, name), name


@pytest.mark.parametrize(
    "public",
    [
        "parallelkit",
        "parallelkit.sqlalchemy",
        "parallelkit.redis",
        "parallelkit.taskiq",
        "parallelkit.otel",
        "parallelkit.asgi",
        "parallelkit.probes",
    ],
)
def test_public_names_live_in_the_public_module(public: str) -> None:
    """Every public name's ``__module__`` is the path users import it from."""
    module = importlib.import_module(public)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            continue
        where = getattr(obj, "__module__", public)
        private = any(part.startswith("_") for part in where.split(".")[1:])
        assert not private, f"{public}.{name}.__module__ is {where}"


def test_every_public_module_has_all() -> None:
    for info in pkgutil.iter_modules(pk.__path__):
        if info.name.startswith("_") or info.name == "pytest_plugin":
            continue
        module = importlib.import_module(f"parallelkit.{info.name}")
        assert hasattr(module, "__all__"), f"parallelkit.{info.name} has no __all__"


def _kinds(fn: object) -> dict[str, inspect._ParameterKind]:
    return {n: p.kind for n, p in inspect.signature(fn).parameters.items()}  # type: ignore[arg-type]


def test_fanout_signatures() -> None:
    kw = inspect.Parameter.KEYWORD_ONLY
    for fn in (pk.map, pk.imap):
        kinds = _kinds(fn)
        assert kinds["fn"] == inspect.Parameter.POSITIONAL_ONLY
        assert kinds["items"] == inspect.Parameter.POSITIONAL_ONLY
        for option in ("limit", "rate", "timeout", "retry", "settle"):
            assert kinds[option] == kw, (fn, option)
    gather = inspect.signature(pk.gather).parameters
    assert gather["aws"].kind == inspect.Parameter.VAR_POSITIONAL
    assert {n: p.default for n, p in gather.items() if p.kind == kw} == {
        "limit": None,
        "rate": None,
        "timeout": None,
        "retry": None,
        "settle": False,
    }
    assert inspect.signature(pk.imap).parameters["ordered"].default is False


def test_the_options_of_limiter_and_retry_are_keyword_only() -> None:
    # every option is keyword-only: pk.Limiter(4, 10) does not guess which is the rate
    retry_options = ("attempts", "backoff", "max_backoff", "jitter", "on")
    for cls, options in ((pk.Limiter, ("concurrency", "rate", "burst")), (pk.Retry, retry_options)):
        kinds = _kinds(cls)
        assert {name: kinds[name] for name in options} == dict.fromkeys(
            options, inspect.Parameter.KEYWORD_ONLY
        ), cls
    with pytest.raises(TypeError):
        pk.Limiter(4, 10)  # type: ignore[misc]
    with pytest.raises(TypeError):
        pk.Retry(5)  # type: ignore[misc]


def test_limiter_and_retry_signatures() -> None:
    limiter = inspect.signature(pk.Limiter).parameters
    assert limiter["concurrency"].default is None
    assert limiter["rate"].default is None
    retry = inspect.signature(pk.Retry).parameters
    assert retry["attempts"].default == 3
    assert {"backoff", "on"} <= set(retry)


def test_error_tree() -> None:
    for name in ("CycleError", "StartupError", "DefinitionError", "DependencyFailed"):
        assert issubclass(getattr(pk, name), pk.ParallelkitError)
