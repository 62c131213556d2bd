"""pk.Timeline renderings with awkward names: Mermaid keywords, wide characters."""

from __future__ import annotations

import html
import re
import unicodedata

import pytest

import parallelkit as pk
from parallelkit import Span

# Mermaid's gantt lexer (case-insensitive, first rule that matches wins) reads a line
# that starts with one of these words as that statement, not as a task: a step named
# ``title`` became the diagram's title and its bar was lost; ``call`` / ``click``
# broke the diagram.
KEYWORDS = [
    "title", "dateFormat", "axisFormat", "tickInterval", "includes", "excludes",
    "todayMarker", "weekday", "accDescription", "accTitle", "accDescr", "call",
    "click", "gantt", "topAxis", "inclusiveEndDates", "Title", "WEEKDAY",
]  # fmt: skip
STATEMENT = re.compile(
    r"(acctitle|accdescr)\s*:|(call|click)\s|(gantt|topaxis|inclusiveenddates)\b"
    r"|(dateformat|axisformat|tickinterval|includes|excludes|todaymarker|weekday"
    r"|title|accdescription)\s",
    re.IGNORECASE,
)


def task_lines(mermaid: str) -> list[str]:
    return [
        line.strip() for line in mermaid.splitlines()[4:] if not line.strip().startswith("section ")
    ]


@pytest.mark.parametrize("name", KEYWORDS)
def test_to_mermaid_keeps_a_span_named_like_a_mermaid_keyword(name: str) -> None:
    timeline = pk.Timeline([Span("charge", 0, 0, 1), Span(name, 1, 1, 2, "ok", ("charge",))])
    lines = task_lines(timeline.to_mermaid())
    assert len(lines) == 2
    for line in lines:
        assert not STATEMENT.match(line), line  # a task line, not a statement
    text, _, data = lines[1].partition(" :")
    # a Mermaid entity code (``#116;`` for ``t``) that Mermaid shows as the character
    assert html.unescape(text.replace("#", "&#")) == name
    assert data == "crit, done, s1, 1000, 2000"
    assert lines[0] == "charge :crit, done, s0, 0, 1000"  # other names are untouched


def test_to_mermaid_leaves_names_that_only_contain_a_keyword() -> None:
    names = ["subtitle", "title_page", "call_api", "gantt_chart", "weekdays"]
    timeline = pk.Timeline([Span(n, 0, 0, 1) for n in names])
    assert [line.partition(" :")[0] for line in task_lines(timeline.to_mermaid())] == names


def display_width(text: str) -> int:
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def test_to_text_aligns_the_bars_of_wide_and_combining_names() -> None:
    timeline = pk.Timeline(
        [
            Span("注文", 0, 0, 1),  # two wide characters: four columns
            Span("cafe\u0301", 1, 1, 2, "ok", ("注文",)),  # e + a combining accent: 4 columns
            Span("ab", 0, 0, 2),
        ]
    )
    rows = timeline.to_text(width=10).splitlines()[1:4]
    bars = [display_width(row[: row.index("|")]) for row in rows]
    assert bars == [5, 5, 5], rows  # every bar starts in the same column
    assert rows[0].startswith("注文 |")
    assert rows[1].startswith("ab   |")  # (rows in order of start)
    assert rows[2].startswith("cafe\u0301 |")
