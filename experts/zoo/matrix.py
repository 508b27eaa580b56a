"""Task x model accuracy matrix: saved as JSON and markdown, printed as a table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from experts.atomic import write_bytes_atomic, write_json_atomic


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
        """Per expert row: own-task accuracy minus its best accuracy on another task's
        column *relative to that task's own experts*. Positive = diagonal-dominant.

        For task t and expert e != t, the gap is min over experts of t (any kind) on
        t minus e's accuracy on t; the margin of e is the smallest gap over t.
        """
        own_best = {
            t: max(acc[t] for row, acc in self.rows.items() if self.own_task(row) == t) for t in self.tasks
        }
        out = {}
        for row, acc in self.rows.items():
            mine = self.own_task(row)
            if mine is None:
                continue
            out[row] = min(own_best[t] - acc[t] for t in self.tasks if t != mine)
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
        data = {"suite": self.suite, "tasks": self.tasks, "rows": self.rows, "meta": {**self.meta, "title": title}}
        write_json_atomic(directory / f"{self.suite}.json", data, sort_keys=False)
        write_bytes_atomic(directory / f"{self.suite}.md", self.to_markdown(f"{self.suite}: {title}").encode())

    @classmethod
    def load(cls, path: Path) -> "AccuracyMatrix":
        data = json.loads(Path(path).read_text())
        return cls(data["suite"], data["tasks"], data["rows"], data.get("meta", {}))
