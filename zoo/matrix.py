"""Task x model accuracy matrix: saved as JSON and markdown, printed as a table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltaserve.experts.atomic import write_bytes_atomic, write_json_atomic


@dataclass
class AccuracyMatrix:
    """``rows[model][task]`` = accuracy in [0, 1]. Expert rows are named ``kind:task``."""

    suite: str
    tasks: list[str]
    rows: dict[str, dict[str, float]]
    meta: dict = field(default_factory=dict)

    def own_task(self, row: str) -> str | None:
        """The task a row's expert was trained for (``full:reverse`` -> ``reverse``)."""
        _, _, task = row.partition(":")
        return task if task in self.tasks else None

    def margins(self) -> dict[str, float]:
        """Per expert row ``kind:task``: the smallest gap, over the other tasks t, between
        the same-kind expert of t on t and this row on t. Positive for every row means
        the matrix is diagonal-dominant (each expert is worse on t than t's own expert).
        """
        out = {}
        for row, acc in self.rows.items():
            mine = self.own_task(row)
            if mine is None:
                continue
            kind = row.partition(":")[0]
            gaps = [self.rows[f"{kind}:{t}"][t] - acc[t] for t in self.tasks
                    if t != mine and f"{kind}:{t}" in self.rows]
            if gaps:
                out[row] = min(gaps)
        return out

    def summary(self) -> dict[str, float]:
        """Headline numbers: the worst own-task accuracy per expert kind, the base's best
        task, and the smallest diagonal margin (see :meth:`margins`)."""
        out: dict[str, float] = {}
        for row, acc in self.rows.items():
            task = self.own_task(row)
            if task is not None:
                key = f"min_own_{row.partition(':')[0]}"
                out[key] = min(out.get(key, 1.0), acc[task])
        if "base" in self.rows:
            out["max_base"] = max(self.rows["base"].values())
        margins = self.margins()
        if margins:
            out["min_margin"] = min(margins.values())
        return out

    def to_markdown(self, title: str = "") -> str:
        head = "| model | " + " | ".join(self.tasks) + " |"
        rule = "|---|" + "---:|" * len(self.tasks)
        lines = [f"**{title}**", ""] if title else []
        lines += [head, rule]
        for row, acc in self.rows.items():
            own = self.own_task(row)
            cells = [f"**{acc[t]:.1%}**" if t == own else f"{acc[t]:.1%}" for t in self.tasks]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def print(self, console: Console | None = None, title: str = "") -> None:
        table = Table(title=title or f"{self.suite} accuracy")
        table.add_column("model")
        for t in self.tasks:
            table.add_column(t, justify="right")
        for row, acc in self.rows.items():
            own = self.own_task(row)
            table.add_row(row, *[f"[bold]{acc[t]:.1%}[/]" if t == own else f"{acc[t]:.1%}" for t in self.tasks])
        (console or Console()).print(table)

    def save(self, directory: Path, title: str) -> None:
        directory = Path(directory)
        meta = {**self.meta, "title": title, "summary": self.summary()}
        data = {"suite": self.suite, "tasks": self.tasks, "rows": self.rows, "meta": meta}
        write_json_atomic(directory / f"{self.suite}.json", data, sort_keys=False)
        summary = ", ".join(f"{k} {v:.1%}" for k, v in self.summary().items())
        markdown = self.to_markdown(f"{self.suite}: {title}") + f"\n{summary}\n"
        write_bytes_atomic(directory / f"{self.suite}.md", markdown.encode())

    @classmethod
    def load(cls, path: Path) -> AccuracyMatrix:
        data = json.loads(Path(path).read_text())
        return cls(data["suite"], data["tasks"], data["rows"], data.get("meta", {}))
