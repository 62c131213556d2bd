"""Timeline: what ran when, measured on anyio's clock, and the chain that set the makespan.

One :class:`Span` per unit of work (a :class:`~parallelkit.Flow` step, or an
:class:`~parallelkit.Orchestrator` service's start / stop), recorded by the graph
engine in :mod:`parallelkit._graph.graph`. A :class:`Timeline` renders the spans as a
compact terminal Gantt chart, a Mermaid ``gantt`` diagram or a JSON-ready dict, and
finds the critical path: the dependency chain whose end set the total time.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from typing_extensions import final

from .._core.check import count

__all__ = ["Span", "SpanStatus", "Timeline"]

SpanStatus = Literal["ok", "error", "cancelled", "skipped"]


@final
@dataclass(frozen=True, slots=True)
class Span:
    """One unit of work on a :class:`Timeline`.

    All times are absolute readings of :func:`anyio.current_time` (seconds); use
    :attr:`Timeline.origin` to make them relative to the start of the run.

    Attributes:
        name: the step (or service) name.
        queued: when it was ready and waited only for a ``limit`` slot (its
            dependencies had finished). A run without ``limit`` has no slot to
            wait for: there ``queued`` is ``start``.
        start: when it actually started (later than ``queued`` when it waited
            for a ``limit`` slot).
        end: when it finished (or failed, or was cancelled).
        status: ``"ok"``, ``"error"``, ``"cancelled"`` or ``"skipped"`` (settle
            mode: a dependency failed, so it never ran; ``start == end``). An
            orchestrator's ``"stop"`` span says ``"error"`` when the tear-down
            raised and ``"cancelled"`` when its ``stop_timeout`` (or a forced
            stop) cut it short; the shutdown went on either way. A service that
            crashed while running was torn down when it crashed: its ``"stop"``
            span says ``"error"`` (the crash recorded on its trace span), or
            ``"cancelled"`` when its ``stop_timeout`` cut that tear-down short. A
            service that reached its ``yield`` but did not become ready has a
            ``"stop"`` span too (its status by how its tear-down ended); one that
            failed before its ``yield`` has none. A ``"ready"`` span whose probe
            failed (raised or timed out) says ``"error"``.
        waited_for: the names it depended on.
        kind: what the span measures: ``"step"`` for a flow step; the
            orchestrator records ``"start"`` (set-up until ready), ``"ready"``
            (the readiness wait of a service with a probe) and ``"stop"``.
    """

    name: str
    queued: float
    start: float
    end: float
    status: SpanStatus = "ok"
    waited_for: tuple[str, ...] = ()
    kind: str = "step"

    @property
    def duration(self) -> float:
        """Seconds from :attr:`start` to :attr:`end`."""
        return self.end - self.start

    @property
    def wait(self) -> float:
        """Seconds it was ready but waited for a slot (:attr:`start` - :attr:`queued`)."""
        return self.start - self.queued


@final
class Timeline:
    """The measured spans of one run, with renderings and the critical path.

    Returned as ``result.timeline`` by :meth:`Flow.run <parallelkit.Flow.run>` (and
    ``running.timeline`` by the orchestrator). Iterating yields the spans in the
    order they finished; ``timeline["charge"]`` is the span of one name.

    Args:
        spans: the spans, in any order.
        origin: the :func:`anyio.current_time` reading when the run started
            (default: the earliest ``queued`` time).
        name: a title for the renderings (the flow's name).

    Example:
        ```python
        result = await flow.run(payment_id="p1")
        print(result.timeline.to_text())
        [s.name for s in result.timeline.critical_path()]   # ['charge', 'record']
        ```
    """

    __slots__ = ("_on_add", "_origin", "_raw", "_spans", "name")

    def __init__(
        self, spans: Iterable[Span] = (), *, origin: float | None = None, name: str | None = None
    ) -> None:
        self._spans: list[Span] = list(spans)
        # recorded by the graph engine, not yet read: 7 fields per span, flat (no
        # object per span until the timeline is read)
        self._raw: list[Any] = []
        self._origin = origin
        self.name = name
        self._on_add: Callable[[Span], object] | None = None
        """Called with each span recorded (set by an instrumentation's trace)."""

    # -- recording (used by the graph engine and the orchestrator) --------------
    def _add(self, span: Span) -> None:
        self._done.append(span)
        if self._on_add is not None:
            self._on_add(span)

    def _record(
        self,
        name: str,
        queued: float,
        start: float,
        end: float,
        status: SpanStatus,
        waited_for: tuple[str, ...],
        kind: str,
    ) -> None:
        """Record a span; the :class:`Span` is built when the timeline is read (a
        flow run per request whose timeline nobody reads builds none). The graph
        engine's success path (``Run._node``) writes ``_raw`` the same way itself."""
        if self._on_add is None:
            self._raw += (name, queued, start, end, status, waited_for, kind)
        else:
            self._add(Span(name, queued, start, end, status, waited_for, kind))

    @property
    def _done(self) -> list[Span]:
        """Every span recorded so far, in order."""
        raw = self._raw
        if raw:
            self._spans.extend([Span(*raw[i : i + 7]) for i in range(0, len(raw), 7)])
            raw.clear()
        return self._spans

    # -- reading -------------------------------------------------------------------
    @property
    def spans(self) -> tuple[Span, ...]:
        """All spans, in the order they were recorded (the order they finished)."""
        return tuple(self._done)

    @property
    def origin(self) -> float:
        """The clock reading at the start of the run (seconds, anyio's clock)."""
        if self._origin is not None:
            return self._origin
        return min((s.queued for s in self._done), default=0.0)

    @property
    def total(self) -> float:
        """Seconds from the start of the run to the end of its last span (the makespan)."""
        if not self._done:
            return 0.0
        return max(s.end for s in self._done) - self.origin

    def __len__(self) -> int:
        return len(self._done)

    def __iter__(self) -> Iterator[Span]:
        return iter(tuple(self._done))

    def __getitem__(self, name: str) -> Span:
        """The latest span recorded for ``name``; ``KeyError`` if there is none."""
        for span in reversed(self._done):
            if span.name == name:
                return span
        msg = f"no span named {name!r}; spans: {sorted({s.name for s in self._done})}"
        raise KeyError(msg)

    def __repr__(self) -> str:
        title = f"{self.name!r}, " if self.name else ""
        return f"<Timeline {title}{len(self._done)} spans, total={self.total * 1000:.1f} ms>"

    def critical_path(self, kind: str | None = None) -> tuple[Span, ...]:
        """The dependency chain that set the makespan, first span first.

        Start from the span that ended last; step to the dependency (among its
        ``waited_for``) that ended last; repeat until a span had no dependencies.
        Shortening any other span cannot finish the run earlier: this is the chain
        to optimise. Of spans that ended at the same reading (a step that does not
        suspend ends when the one it waited for did), the one that waited for the
        others ended last: the chain goes on to it.

        An orchestrator's timeline also holds the ``"stop"`` spans of its
        shutdown, a separate phase that runs in reverse order: they are left out
        unless asked for, so after a shutdown the critical path is still the
        start-up's.

        Args:
            kind: only follow spans of this kind, e.g. ``"stop"`` for the chain
                that set the shutdown's length (default: every kind but
                ``"stop"``, following the kind of the span that ended last).
        """
        spans = [s for s in self._done if s.status != "skipped"]
        if kind is None:
            spans = [s for s in spans if s.kind != "stop"]
        else:
            spans = [s for s in spans if s.kind == kind]
        if not spans:
            return ()
        last = _ended_last(spans)
        spans = [s for s in spans if s.kind == last.kind]
        by_name: dict[str, Span] = {}
        for span in spans:
            by_name[span.name] = span
        chain = [last]
        seen = {last.name}
        while True:
            deps = [by_name[d] for d in chain[-1].waited_for if d in by_name and d not in seen]
            if not deps:
                break
            prev = _ended_last(deps)
            seen.add(prev.name)
            chain.append(prev)
        chain.reverse()
        return tuple(chain)

    # -- renderings ------------------------------------------------------------------
    def to_text(self, width: int = 40) -> str:
        """A compact Gantt chart for the terminal.

        One row per span: ``░`` while it waited for a ``limit`` slot (only a
        limited run has such waits), ``█`` while it ran. The last line names the
        critical path (:meth:`critical_path`: the start-up or the steps, not a
        shutdown).

        Args:
            width: characters for the bar area.

        Raises:
            TypeError: ``width`` not an int. ValueError: ``width`` below 10.
        """
        width = count("width", width, minimum=10)
        origin, total = self.origin, self.total
        title = f"{_printable(self.name)} " if self.name else ""
        lines = [f"{title}total {total * 1000:.1f} ms, {len(self._done)} spans"]
        if not self._done:
            return lines[0]
        scale = width / total if total > 0 else 0.0
        label = max(_columns(_label(s)) for s in self._done)
        for span in sorted(self._done, key=lambda s: (s.start, s.end)):
            ran = span.status != "skipped"
            a = round((span.start - origin) * scale)
            a = min(a, width - 1) if ran else a  # a span that ran shows, even at the end
            q = min(round((span.queued - origin) * scale), a)
            b = max(round((span.end - origin) * scale), a + ran)
            bar = " " * q + "░" * (a - q) + "█" * (b - a)
            bar = bar[:width].ljust(width)
            times = f"{(span.start - origin) * 1000:8.1f} → {(span.end - origin) * 1000:8.1f} ms"
            name = _label(span)
            name += " " * (label - _columns(name))  # padded by the columns it fills
            line = f"{name} |{bar}| {times}  {span.status}"
            lines.append(line.rstrip())
        path = self.critical_path()
        if path:
            names = " → ".join(s.name for s in path)
            lines.append(f"critical path: {names}")
        return "\n".join(lines)

    def to_mermaid(self, title: str | None = None) -> str:
        """A Mermaid ``gantt`` diagram (times in milliseconds from the run start).

        Spans on the critical path are tagged ``crit``; failed ones ``active``.
        Paste it into a Markdown page that renders Mermaid. A name that Mermaid
        would read as a keyword (a step named ``title``, ``section`` or ``call``) starts with
        an entity code (``#116;itle``), which Mermaid shows as the name.
        """
        origin = self.origin
        crit = {id(s) for s in self.critical_path()}
        heading = title if title is not None else (self.name or "timeline")
        lines = [
            "gantt",
            f"    title {_mermaid_text(heading)}",
            "    dateFormat x",
            "    axisFormat %S.%L",
        ]
        section = None
        for index, span in enumerate(sorted(self._done, key=lambda s: (s.kind, s.start))):
            if span.kind != section:
                section = span.kind
                lines.append(f"    section {_mermaid_text(section)}")
            tags = []
            if id(span) in crit:
                tags.append("crit")
            if span.status == "ok":
                tags.append("done")
            elif span.status in ("error", "cancelled"):
                tags.append("active")
            start = round((span.start - origin) * 1000)
            end = max(round((span.end - origin) * 1000), start)
            tag = ", ".join([*tags, f"s{index}"])
            lines.append(f"    {_mermaid_task(span.name)} :{tag}, {start}, {end}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the total and each span, in seconds from the run start."""
        origin = self.origin
        return {
            "name": self.name,
            "total": self.total,
            "critical_path": [s.name for s in self.critical_path()],
            "spans": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "status": s.status,
                    "queued": s.queued - origin,
                    "start": s.start - origin,
                    "end": s.end - origin,
                    "waited_for": list(s.waited_for),
                }
                for s in self._done
            ],
        }


def _ended_last(spans: list[Span]) -> Span:
    """The span that ended last. Of those that ended at the same reading, the first
    that none of the others waited for (it started once they had ended)."""
    end = max(s.end for s in spans)
    tied = [s for s in spans if s.end == end]
    if len(tied) == 1:
        return tied[0]
    waited = {d for s in tied for d in s.waited_for}
    return next((s for s in tied if s.name not in waited), tied[0])


def _label(span: Span) -> str:
    label = span.name if span.kind == "step" else f"{span.name} ({span.kind})"
    return _printable(label)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # a line break, a tab, an escape code


def _printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``): one row per span."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _columns(text: str) -> int:
    """The terminal columns ``text`` fills: wide (East Asian) characters two,
    combining marks none."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def _mermaid_text(text: str) -> str:
    # ``%`` starts a comment (``%%x``, or ``a%b``: a character then ``%``)
    for bad in (":", ";", "#", "%"):
        text = text.replace(bad, "_")
    return _CONTROL.sub("_", text)


# A task line that Mermaid's gantt lexer (case-insensitive; the first rule that
# matches wins) would read as a statement: ``title :done, ...`` sets the title.
_MERMAID_STATEMENT = re.compile(
    r"(?:acctitle|accdescr)\s*:|(?:call|click)\s|(?:gantt|topaxis|inclusiveenddates)\b"
    r"|(?:dateformat|axisformat|tickinterval|includes|excludes|todaymarker|weekday|title"
    r"|accdescription|section|weekend)\s|\d{4}-\d\d-\d\d\b",
    re.IGNORECASE,
)


def _mermaid_task(name: str) -> str:
    """A task's text: a name that Mermaid would read as a keyword gets its first
    character as a Mermaid entity code (``#116;itle``), which it shows as ``title``."""
    text = _mermaid_text(name)
    if _MERMAID_STATEMENT.match(f"{text} :"):
        text = f"#{ord(text[0])};{text[1:]}"
    return text
