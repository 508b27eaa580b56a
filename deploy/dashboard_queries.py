"""Every PromQL expression of a Grafana dashboard, ready to hand to Prometheus.

Used by tests/test_deploy_static.py (each expression must parse and name only
metrics from server/metrics.py) and by the live test that evaluates every
panel against a real Prometheus scraping a real server.

    >>> dashboard = load_dashboard(DASHBOARD)
    >>> for query in panel_queries(dashboard):
    ...     print(query.panel, query.ref_id, concrete_expr(query.expr))

Grafana variables in expressions (``$__rate_interval``, ``$instance``, …) are
replaced by :func:`concrete_expr` with a fixed range and each template
variable's "All" value, which is what the dashboard shows on first load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "deltaserve.json"

# Grafana's built-in interval variables, replaced by one fixed range.
BUILTIN_RANGES = ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}", "$__range", "${__range}")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan", "atan2"})


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: the panel's title, the target's refId and its PromQL."""

    panel: str
    ref_id: str
    expr: str


def load_dashboard(path: Path | str = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every non-hidden Prometheus target of every panel, in dashboard order."""
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("hide") or not target.get("expr"):
                continue
            queries.append(PanelQuery(panel.get("title", ""), target.get("refId", ""), target["expr"]))
    return queries


def template_defaults(dashboard: dict[str, Any]) -> dict[str, str]:
    """Value each query-type template variable takes when set to "All" (its allValue)."""
    defaults = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") in ("query", "custom"):
            defaults[variable["name"]] = variable.get("allValue") or ".*"
    return defaults


def concrete_expr(expr: str, variables: dict[str, str] | None = None, rate_range: str = "1m") -> str:
    """``expr`` with Grafana's interval variables set to ``rate_range`` and template variables substituted.

    ``variables`` maps a template variable name to its value (e.g. from
    :func:`template_defaults`); a variable left in the result raises ValueError.
    """
    for builtin in BUILTIN_RANGES:
        expr = expr.replace(builtin, rate_range)
    # Longest names first, so $model never eats the start of $models.
    for name in sorted(variables or {}, key=len, reverse=True):
        value = (variables or {})[name]
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in expr:
        raise ValueError(f"unresolved Grafana variable in {expr!r}")
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels excluded).

    A light tokenizer, strict in the safe direction: anything that is not a
    function call, an aggregation keyword or a label is reported as a metric.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        before = text[: match.start()].rstrip()
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # a unit or exponent of a number literal, e.g. 1e3
        names.add(name)
    return names
