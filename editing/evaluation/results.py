"""What an evaluation run writes and reads: per-case rows (JSONL + CSV), the summary (JSON +
Markdown), comparison tables across runs, and plain data for :mod:`viz.plots`.

Rows hold ``pre_<metric>`` (unedited model) and ``post_<metric>`` (edited model) for the same
case; summaries hold the means of both (``unedited`` / ``edited``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tracing.distributed import Ranks
from tracing.errors import InvalidInput
from tracing.io import atomic_path, write_text_atomic

#: (key, label, is a rate shown in percent) in table order, CounterFact then zsRE.
METRIC_LABELS: tuple[tuple[str, str, bool], ...] = (
    ("score", "Score (harmonic mean of ES, PS, NS)", True),
    ("efficacy_success", "Efficacy success ES", True),
    ("paraphrase_success", "Paraphrase success PS", True),
    ("neighborhood_success", "Neighbourhood success NS", True),
    ("efficacy_magnitude", "Efficacy magnitude EM", True),
    ("paraphrase_magnitude", "Paraphrase magnitude PM", True),
    ("neighborhood_magnitude", "Neighbourhood magnitude NM", True),
    ("rewrite_acc", "EasyEdit rewrite_acc", True),
    ("rephrase_acc", "EasyEdit rephrase_acc", True),
    ("locality", "EasyEdit locality", True),
    ("strict_efficacy", "Strict efficacy (greedy continuation is the new target)", True),
    ("strict_paraphrase", "Strict paraphrase (greedy, on paraphrases)", True),
    ("fluency", "Fluency (n-gram entropy, bits)", False),
    ("efficacy_acc", "zsRE efficacy (token acc.)", True),
    ("paraphrase_acc", "zsRE paraphrase (token acc.)", True),
    ("specificity_acc", "zsRE specificity (token acc.)", True),
)
_SHORT = {
    "score": "S",
    "efficacy_success": "ES",
    "paraphrase_success": "PS",
    "neighborhood_success": "NS",
    "efficacy_magnitude": "EM",
    "paraphrase_magnitude": "PM",
    "neighborhood_magnitude": "NM",
    "rewrite_acc": "rewrite_acc",
    "rephrase_acc": "rephrase_acc",
    "locality": "locality",
    "strict_efficacy": "strict ES",
    "strict_paraphrase": "strict PS",
    "fluency": "fluency",
    "efficacy_acc": "zsRE eff.",
    "paraphrase_acc": "zsRE para.",
    "specificity_acc": "zsRE spec.",
}


@dataclass
class EvalSummary:
    """The outcome of one evaluation run (see :func:`editing.evaluation.runner.evaluate`)."""

    dataset: str
    method: str
    model: str
    fingerprint: str
    n: int  # cases evaluated
    n_requested: int
    n_skipped: int  # subject missing from the prompt, untokenisable target, ...
    n_unknown: int  # examined but dropped by the only-known filter
    n_failed: int  # the method refused the request or could not compute the edit
    only_known: bool
    known_rule: str
    seed: int
    batch: int
    joint: bool  # all requests of a batch edited at once
    layers: list[int] | None
    hparams: dict | None
    edited: dict[str, float | None]
    unedited: dict[str, float | None]
    seconds_per_edit: float | None
    seconds_per_case: float | None
    seconds_total: float
    generation: dict | None
    seconds_per_edit_median: float | None = None  # robust to a first edit that builds statistics
    skipped: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalSummary:
        """Inverse of :meth:`to_dict` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def load(cls, path: str | Path) -> EvalSummary:
        """Read a ``summary.json``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def markdown(self) -> str:
        """A Markdown table of every metric, unedited and edited side by side, with the run's
        settings underneath."""
        lines = ["| metric | unedited | edited |", "|---|---:|---:|"]
        for key, label, rate in METRIC_LABELS:
            if self.edited.get(key) is None and self.unedited.get(key) is None:
                continue
            lines.append(
                f"| {label} | {fmt(self.unedited.get(key), rate)} | "
                f"{fmt(self.edited.get(key), rate)} |"
            )
        rates = "rates and magnitudes in percent"
        lines += [
            "",
            f"{self.dataset}, method {self.method}, model {self.model} ({self.fingerprint}); "
            f"{self.n} cases ({rates}); skipped {self.n_skipped}, not known {self.n_unknown}, "
            f"failed {self.n_failed}; layers {self.layers}; seconds per edit "
            f"{fmt(self.seconds_per_edit, False)} (median "
            f"{fmt(self.seconds_per_edit_median, False)}), per case "
            f"{fmt(self.seconds_per_case, False)}.",
        ]
        if self.generation:
            lines.append(f"Fluency text: {self.generation}.")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def fmt(value: float | None, rate: bool) -> str:
    """Table cell: percent with one decimal for rates, three significant decimals otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}" if rate else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def comparison_table(summaries: Sequence[EvalSummary]) -> str:
    """One Markdown table across runs (ROME-paper style): a row per method, each under the
    unedited model's row for the cases it scored (runs that scored the same cases share one)."""
    if not summaries:
        raise InvalidInput("no summaries to compare")
    keys = [k for k, _, _ in METRIC_LABELS if any(s.edited.get(k) is not None for s in summaries)]
    rate = {k: r for k, _, r in METRIC_LABELS}
    head = ["method", "n", *[_SHORT[k] for k in keys], "s / edit", "s / case"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    groups: dict[str, list[EvalSummary]] = {}  # runs that scored the same unedited cases
    for s in summaries:
        groups.setdefault(json.dumps(s.unedited, sort_keys=True), []).append(s)
    rows: list[tuple[str, int, dict, float | None, float | None]] = []
    for group in groups.values():
        label = (
            "unedited"
            if len(groups) == 1
            else ("unedited (cases of " + ", ".join(s.method for s in group) + ")")
        )
        rows.append((label, group[0].n, group[0].unedited, None, None))
        for s in group:
            if s.method == "none":
                continue
            name = s.method if not s.joint or s.batch == 1 else f"{s.method} ({s.batch} at once)"
            rows.append((name, s.n, s.edited, s.seconds_per_edit, s.seconds_per_case))
    for label, n, vals, per_edit, per_case in rows:
        cells = [
            label,
            str(n),
            *[fmt(vals.get(k), rate[k]) for k in keys],
            fmt(per_edit, False),
            fmt(per_case, False),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- rows


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file written by :func:`append_rows`, in order; none when it does
    not exist. A torn last line from an interrupted run is ignored (the run redoes it)."""
    out: list[dict] = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def read_rows(path: Path) -> dict[int, dict]:
    """Rows of a JSONL file by ``case_id`` (:func:`read_jsonl`)."""
    return {int(row["case_id"]): row for row in read_jsonl(path)}


def append_rows(path: Path, rows: Iterable[Mapping]) -> None:
    """Append rows to a JSONL file (folders created as needed), flushed to disk."""
    rows = list(rows)
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()


def write_jsonl(path: Path, rows: Iterable[Mapping]) -> None:
    """Write rows as a JSONL file, replacing any old one atomically (folders created)."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    """Rows as CSV (list-valued fields such as generated texts left out)."""
    cols = list(
        dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict)))
    )
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in cols})


def split_prefixed(rows: Sequence[Mapping], prefix: str) -> list[dict]:
    """The ``prefix``-ed metric columns of each row, prefix removed."""
    return [
        {
            k[len(prefix) :]: v
            for k, v in r.items()
            if k.startswith(prefix) and (v is None or isinstance(v, (int, float)))
        }
        for r in rows
    ]


# --------------------------------------------------------------------------- viz data


def case_bars(row: Mapping) -> list[dict]:
    """Data for :func:`viz.plots.plot_edit_bars` from one CounterFact case row: the mean
    probability of the true and the new target on the edit, paraphrase and neighbourhood
    prompts, before and after the edit."""
    out = []
    for kind, key in (
        ("edit", "rewrite"),
        ("paraphrase", "paraphrase"),
        ("neighborhood", "neighborhood"),
    ):
        for target in ("true", "new"):
            before, after = row.get(f"pre_{key}_p_{target}"), row.get(f"post_{key}_p_{target}")
            if before is None or after is None:
                continue
            out.append({"prompt_kind": kind, "target": target, "before": before, "after": after})
    if not out:
        raise InvalidInput(f"row of case {row.get('case_id')} holds no CounterFact probabilities")
    return out


def scaling_point(summary: EvalSummary, edited: bool = True) -> dict:
    """One point for :func:`viz.plots.plot_scaling`: ``{"method", "n_edits", "efficacy",
    "paraphrase", "neighborhood", "score", ...}`` (rates in [0, 1]); ``edited=False`` gives the
    unedited model's point (method ``"unedited"``)."""
    vals = summary.edited if edited else summary.unedited
    point: dict[str, Any] = {
        "method": summary.method if edited else "unedited",
        "n_edits": summary.batch if summary.joint else 1,
        "n_cases": summary.n,
        "efficacy": vals.get("efficacy_success", vals.get("efficacy_acc")),
        "paraphrase": vals.get("paraphrase_success", vals.get("paraphrase_acc")),
        "neighborhood": vals.get("neighborhood_success", vals.get("specificity_acc")),
        "score": vals.get("score"),
    }
    for key in ("rewrite_acc", "rephrase_acc", "locality", "fluency"):
        if vals.get(key) is not None:
            point[key] = vals[key]
    if edited:
        point["seconds_per_edit"] = summary.seconds_per_edit
    return point


# --------------------------------------------------------------------------- torchrun rows


def rank_rows_path(run_dir: Path, here: Ranks) -> Path:
    """The rows file of one torchrun rank (merged into ``cases.jsonl`` at the end)."""
    return run_dir / f"cases.rank{here.rank}of{here.world}.jsonl"


def read_done(run_dir: Path) -> dict[int, dict]:
    """Rows already evaluated: ``cases.jsonl`` and what an interrupted torchrun run left in
    its ranks' files."""
    done = read_rows(run_dir / "cases.jsonl")
    for path in sorted(run_dir.glob("cases.rank*.jsonl")):
        done.update(read_rows(path))
    return done


def merge_rank_rows(run_dir: Path) -> dict[int, dict]:
    """Fold the ranks' rows files into ``cases.jsonl`` (rewritten atomically), then drop them."""
    done = read_done(run_dir)
    write_jsonl(run_dir / "cases.jsonl", [r for _, r in sorted(done.items())])
    for path in run_dir.glob("cases.rank*.jsonl"):
        path.unlink()
    return done
