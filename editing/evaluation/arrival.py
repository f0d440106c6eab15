"""Edits of a sequential stream grouped by when they arrived: do early edits wear off, or do
later ones take less?

A checkpoint row of :func:`~editing.evaluation.evaluate_sequential` averages over every edit
made so far, so a falling efficacy can mean either. Each checkpoint also keeps every edit's
own metrics (``cases/NNNNN.jsonl``, with ``arrived``: the edits processed when its batch was
done). :func:`arrival_table` groups them by the checkpoint interval they arrived in and
tabulates one metric's mean per group at every checkpoint: read down a column to follow one
cohort of edits as the stream goes on, along a row to compare cohorts in one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from editing.evaluation.results import read_jsonl
from tracing.errors import InvalidInput


@dataclass(frozen=True)
class ArrivalTable:
    """``cells[(checkpoint, cohort)]`` = (mean of ``metric``, number of edits) over the edits
    that arrived in ``cohort`` (an interval of processed requests, ``(start, end]``) as scored
    at ``checkpoint`` (requests processed); ``overall[checkpoint]`` is the mean over all and
    ``edits[checkpoint]`` the number of edits made by then."""

    metric: str
    checkpoints: list[int]
    cohorts: list[tuple[int, int]]
    cells: dict[tuple[int, tuple[int, int]], tuple[float, int]]
    overall: dict[int, float]
    edits: dict[int, int]

    def label(self, cohort: tuple[int, int]) -> str:
        """A cohort's name: the requests it covers, counted from 1."""
        return f"arrived {cohort[0] + 1}-{cohort[1]}"

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """``{"all": [(edits, mean)], <cohort label>: [...]}`` for :func:`viz.plot_arrival`."""
        out = {"all": [(self.edits[n], self.overall[n]) for n in self.checkpoints]}
        for c in self.cohorts:
            out[self.label(c)] = [
                (self.edits[n], self.cells[n, c][0])
                for n in self.checkpoints
                if (n, c) in self.cells
            ]
        return out

    def markdown(self) -> str:
        """The table in Markdown: a row per checkpoint (requests processed, edits made), the
        mean over all edits, then each cohort's (three decimals; blank: not arrived yet)."""
        heads = [self.label(c) for c in self.cohorts]
        lines = [
            f"| requests | edits | {self.metric}, all | " + " | ".join(heads) + " |",
            "|---:|---:|---:|" + "---:|" * len(heads),
        ]
        for n in self.checkpoints:
            cells = [
                f"{self.cells[n, c][0]:.3f}" if (n, c) in self.cells else "" for c in self.cohorts
            ]
            mean = f"{self.overall[n]:.3f}"
            lines.append(f"| {n} | {self.edits[n]} | {mean} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def arrival_table(run_dir: str | Path, metric: str = "efficacy_success") -> ArrivalTable:
    """Group the per-edit rows of a sequential run folder by arrival (module docstring).
    Checkpoints without per-edit rows (runs from before they were kept, row 0) are left
    out; an unknown metric or a folder without any is an :class:`InvalidInput`."""
    run_dir = Path(run_dir)
    marks = sorted(int(r["n_processed"]) for r in read_jsonl(run_dir / "checkpoints.jsonl"))
    scored = {n: read_jsonl(run_dir / "cases" / f"{n:05d}.jsonl") for n in marks if n > 0}
    scored = {n: rows for n, rows in scored.items() if rows}
    if not scored:
        raise InvalidInput(f"{run_dir}: no per-edit checkpoint rows (cases/*.jsonl)")
    if not any(metric in r for rows in scored.values() for r in rows):
        keys = sorted({k for rows in scored.values() for r in rows for k in r})
        raise InvalidInput(f"unknown metric {metric!r}; the rows have {keys}")
    bounds = [0, *[n for n in marks if n > 0]]

    def cohort(arrived: int) -> tuple[int, int]:
        end = next(n for n in bounds[1:] if n >= arrived)
        return bounds[bounds.index(end) - 1], end

    sums: dict[tuple[int, tuple[int, int]], list[float]] = {}
    overall: dict[int, float] = {}
    for n, rows in scored.items():
        values = [
            (cohort(int(r["arrived"])), float(r[metric])) for r in rows if r.get(metric) is not None
        ]
        for c, v in values:
            sums.setdefault((n, c), []).append(v)
        overall[n] = sum(v for _, v in values) / len(values) if values else float("nan")
    cells = {key: (sum(vs) / len(vs), len(vs)) for key, vs in sums.items()}
    cohorts = sorted({c for _, c in cells})
    edits = {n: len(rows) for n, rows in scored.items()}
    return ArrivalTable(metric, sorted(scored), cohorts, cells, overall, edits)
