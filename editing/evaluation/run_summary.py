"""The summary of an evaluation run: its settings, its rows aggregated before and after the
edits, times, failures and notes (:class:`editing.evaluation.results.EvalSummary`), built
once the runner (:mod:`editing.evaluation.runner`) has every row. It reads the run's settings
(:mod:`editing.evaluation.config`) and never imports the runner."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from editing.evaluation.config import NO_EDIT, EvalConfig
from editing.evaluation.metrics import aggregate
from editing.evaluation.results import EvalSummary, split_prefixed, write_csv
from editing.evaluation.tasks import Task
from tracing.io import write_json_atomic
from tracing.models import HookedModel, fingerprint, model_name


def hparams_dict(hp: Any) -> dict | None:
    """Hyper-parameters (an object with ``to_dict``, or a mapping) as a plain dict."""
    if hp is None:
        return None
    return hp.to_dict() if hasattr(hp, "to_dict") else dict(hp)


def finish_run(
    cfg: EvalConfig,
    model: HookedModel,
    label: str,
    task: Task,
    edit_hparams: dict | None,
    run_dir: Path,
    selected: list,
    done: dict[int, dict],
    unit_size: int,
    hp: Any,
) -> EvalSummary:
    """Write the hyper-parameters the edits resolved (``edit_hparams``; a resumed run that made
    no edit reads the earlier ones) and the rows table (``cases.csv``); the summary of the
    run's ``selected`` cases from their rows ``done``."""
    hp_file = run_dir / "hparams.json"
    if edit_hparams is not None:
        write_json_atomic(hp_file, edit_hparams)
    resolved = json.loads(hp_file.read_text(encoding="utf-8")) if hp_file.exists() else None
    rows = [done[c.case_id] for c, _ in selected]
    write_csv(run_dir / "cases.csv", rows)
    return _summary(cfg, model, label, task, rows, run_dir, unit_size, hp, resolved)


def _summary(
    cfg: EvalConfig,
    model: HookedModel,
    label: str,
    task: Task,
    rows: list[dict],
    run_dir: Path,
    unit_size: int,
    hp: Any,
    resolved: dict | None,
) -> EvalSummary:
    ok = [r for r in rows if "failed" not in r]
    edited = cfg.method != NO_EDIT
    edit_s = [r["edit_seconds"] for r in ok]
    layers = list(cfg.layers) if cfg.layers is not None else None
    if layers is None and hp is not None:
        chosen = hp.get("layers") if isinstance(hp, dict) else hp.layers
        layers = list(chosen) if chosen else None
    notes = [f"split {cfg.split!r}"]
    if cfg.only_known and task.kind == "counterfact":
        notes.append(f"only cases the unedited model knows (rule {cfg.known_rule!r})")
    if task.kind == "counterfact":
        notes.append(
            "ROME's reference score (tf-idf consistency) is not computed: ROME's "
            "tf-idf files are not available here"
        )
    gen = cfg.generation
    return EvalSummary(
        dataset=label,
        method=cfg.method,
        model=model_name(model),
        fingerprint=fingerprint(model),
        n=len(ok),
        n_requested=cfg.n,
        n_skipped=0,
        n_unknown=0,
        n_failed=len(rows) - len(ok),
        only_known=cfg.only_known and task.kind == "counterfact",
        known_rule=cfg.known_rule,
        seed=cfg.seed,
        batch=unit_size,
        joint=cfg.is_joint,
        layers=layers,
        hparams=resolved if resolved is not None else hparams_dict(hp),
        edited=aggregate(split_prefixed(ok, "post_")),
        unedited=aggregate(split_prefixed(ok, "pre_")),
        seconds_per_edit=sum(edit_s) / len(edit_s) if edit_s and edited else None,
        seconds_per_case=(
            sum(r["edit_seconds"] + r["eval_seconds"] for r in ok) / len(ok) if ok else None
        ),
        seconds_total=0.0,
        seconds_per_edit_median=statistics.median(edit_s) if edit_s and edited else None,
        generation=None
        if not gen
        else {
            **asdict(gen),
            "sources": {
                src: sum(r.get("gen_source") == src for r in ok) for src in ("record", "subject")
            },
        },
        failures=[{"case_id": r["case_id"], "error": r["failed"]} for r in rows if "failed" in r],
        files={
            k: str(run_dir / f)
            for k, f in (
                ("rows", "cases.jsonl"),
                ("csv", "cases.csv"),
                ("summary", "summary.json"),
                ("table", "summary.md"),
            )
        },
        notes=notes,
    )
