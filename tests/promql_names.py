"""The metric names and label names a PromQL expression uses: enough of PromQL's grammar to
find every selector (a name, its matchers), every bare name and every grouping's labels
(`by`, `without`, `on`, `ignoring`, `group_left`, `group_right`) — for checking dashboards
and alerts against what the code exports, not for evaluating anything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<range>\[[^\]]*\])
      | (?P<duration>\d+(?:ms|[smhdwy])\b)
      | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>])
      | (?P<var>\$\{?\w+\}?)
    )""",
    re.X,
)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}


@dataclass
class Selector:
    metric: str
    labels: list[str] = field(default_factory=list)  # the matchers' label names


@dataclass
class Uses:
    selectors: list[Selector] = field(default_factory=list)
    groupings: list[str] = field(default_factory=list)  # labels named by groupings


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos : pos + 30]!r} in {expr!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def uses(expr: str) -> Uses:
    toks = tokens(expr)
    found = Uses()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in GROUPING:
            i += 1
            if following == "(":
                i, labels = _list(toks, i + 1, ")")
                found.groupings += labels
            continue
        if kind == "ident" and (following == "(" or following in ("by", "without")):
            i += 1  # a function, or an aggregation (its grouping may come first)
            continue
        if kind == "ident" and text not in KEYWORDS:
            selector = Selector(text)
            i += 1
            if following == "{":
                i, selector.labels = _matchers(toks, i + 1)
            found.selectors.append(selector)
            continue
        if kind == "op" and text == "{":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        i += 1
    return found


def _list(toks, i: int, end: str) -> tuple[int, list[str]]:
    labels = []
    while i < len(toks) and toks[i][1] != end:
        if toks[i][0] == "ident":
            labels.append(toks[i][1])
        i += 1
    return i + 1, labels


def _matchers(toks, i: int) -> tuple[int, list[str]]:
    labels = []
    while i < len(toks) and toks[i][1] != "}":
        if (
            toks[i][0] == "ident"
            and i + 1 < len(toks)
            and toks[i + 1][1] in ("=", "!=", "=~", "!~")
        ):
            labels.append(toks[i][1])
        i += 1
    return i + 1, labels


LABEL_VALUES = re.compile(r"^label_values\(\s*(?P<query>.*?)\s*,\s*(?P<label>\w+)\s*\)$")


def template_query(query: str) -> tuple[str, str | None]:
    """A Grafana variable's query: (the PromQL in it, the label it reads or None)."""
    m = LABEL_VALUES.match(query.strip())
    if m:
        return m.group("query"), m.group("label")
    return query, None
