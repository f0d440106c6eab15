"""The evaluation runner: edit CounterFact / zsRE cases with a method, score them before and
after, write rows, a summary and tables; resumable.

``evaluate(model, EvalConfig(dataset="counterfact", method="rome", n=100, out_dir="results"))``
loads the cases, keeps (optionally) those whose true target the unedited model prefers,
skips and counts cases that cannot be evaluated, edits one case at a time or ``batch`` cases
at once (methods registered as batched, e.g. MEMIT; every method with ``joint=True``), scores
every metric of the dataset's task on the edited model, undoes the edit, and writes under
``out_dir/<dataset>_<method>/``: ``cases.jsonl`` (one row per case, appended as it goes, so an
interrupted run resumes where it stopped), ``cases.csv``, ``summary.json``, ``summary.md``
and ``run.json`` (the settings, checked on resume). Unedited scores and generated texts are
cached in ``out_dir/unedited_<dataset>_<weights>.jsonl`` and shared by every method's run.

Only an edit the method refuses (:class:`~tracing.errors.InvalidRequest`) or cannot compute
(:class:`~tracing.errors.EditFailed`) is counted as a failed case; any other error stops the
run (its rows so far stay on disk).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from editing.api import make_edit, resolve_hparams
from editing.edits.edit import Edit
from editing.edits.weights import WeightsGuard, weights_key
from editing.evaluation.cases import (
    UneditedCache,
    case_seed,
    generate_cases,
    select_cases,
)
from editing.evaluation.config import NO_EDIT, EvalConfig
from editing.evaluation.generation import fluency
from editing.evaluation.results import (
    EvalSummary,
    append_rows,
    merge_rank_rows,
    rank_rows_path,
    read_done,
)
from editing.evaluation.run_summary import finish_run, hparams_dict
from editing.evaluation.scoring import ModelScorer, Scorer
from editing.evaluation.tasks import Case, Task, load_cases, split_cases
from editing.methods import get_method
from editing.params import target_tensor
from tracing.chat import chat_template_on
from tracing.distributed import (
    RankFailed,
    barrier,
    gather_objects,
    main_first,
    ranks,
    together,
)
from tracing.errors import EditFailed, InvalidInput, InvalidRequest
from tracing.io import write_json_atomic, write_text_atomic
from tracing.models import HookedModel, model_name

log = logging.getLogger(__name__)


#: Replaces :func:`editing.api.make_edit` in tests (same signature).
EditFn = Callable[..., Edit]


@dataclass
class _Run:
    """The state one run shares between its units."""

    model: HookedModel
    config: EvalConfig
    task: Task
    scorer: Scorer
    cache: UneditedCache
    hparams: Any
    edit_fn: EditFn
    edit_hparams: dict | None = None
    shard_targets: bool = False  # torchrun, joint units: every rank makes the same edit
    target_cache: Path | None = None  # batched methods: per-request targets, for resuming
    guard: WeightsGuard | None = None  # proves every unit's undo bit-exact


def check_run(path: Path, settings: dict) -> None:
    """Refuse to resume a run folder made with other settings (``n`` may differ)."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise InvalidInput(
                f"{path.parent} holds a run with other settings ({', '.join(diff)} differ): "
                "choose another output folder or name, or delete it"
            )
    else:
        write_json_atomic(path, settings)


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def _agreed_edit(sharded: bool, make: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(edit, None)`` (an :class:`~editing.edits.edit.Edit`, or what a stand-in ``edit_fn``
    returns), or ``(None, reason)`` when the method refuses or cannot compute the
    edit (:class:`InvalidRequest`, :class:`EditFailed`: the unit's cases are recorded as
    failed and the run goes on); any other error propagates.

    ``sharded`` (torchrun, every rank making the same edit with its targets split): every
    rank reaches the same outcome. A rank whose share failed raises its own error and the
    others :class:`RankFailed`; here the ranks compare what they saw, and if any rank's edit
    failed as a case does, every rank records that rank's reason and goes on in step; if
    any rank failed otherwise, every rank stops (that one with its error, the others with
    :class:`RankFailed` naming it)."""
    if not sharded:
        try:
            return make(), None
        except (InvalidRequest, EditFailed) as exc:
            return None, str(exc)
    edit, own, report = None, None, None
    try:
        edit = make()
    except (InvalidRequest, EditFailed) as exc:
        report = ("case", str(exc))
    except RankFailed as exc:  # another rank's failure, seen from here: its own report says
        report = ("echo", str(exc))
    except Exception as exc:  # noqa: BLE001  (re-raised below, after the others learn of it)
        own, report = exc, ("stop", f"{type(exc).__name__}: {exc}")
    reports = gather_objects(report)
    for rank, r in enumerate(reports):
        if r is not None and r[0] == "stop":
            if own is not None:
                raise own
            raise RankFailed(f"rank {rank} failed: {r[1]}")
    for r in reports:
        if r is not None and r[0] == "case":
            return None, r[1]
    if report is not None:  # only echoes: nobody's own error to record
        raise RankFailed(report[1])
    echoed = next((r[1] for r in reports if r is not None), None)
    if echoed is not None:
        raise RankFailed(echoed)
    return edit, None


def _run_unit(run: _Run, unit: list[tuple[Case, Any]], todo: set[int]) -> list[dict]:
    """Edit one unit's cases, score those in ``todo`` on the edited model, undo; rows."""
    cfg, model, task = run.config, run.model, run.task
    t0 = time.perf_counter()
    edit = None
    if cfg.method != NO_EDIT:
        requests = [task.request(c) for c, _ in unit]
        extra: dict[str, Any] = {"shard_targets": True} if run.shard_targets else {}
        if run.target_cache is not None:
            extra["target_cache"] = run.target_cache
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case_seed(cfg.seed, unit[0][0].case_id))
            edit, failed = _agreed_edit(
                run.shard_targets,
                lambda: run.edit_fn(
                    model,
                    requests,
                    cfg.method,
                    run.hparams,
                    layers=cfg.layers,
                    progress=False,
                    **extra,
                ),
            )
        if failed is not None:
            log.warning("edit of cases %s failed: %s", [c.case_id for c, _ in unit], failed)
            return [{**task.fields(c), "failed": failed} for c, _ in unit if c.case_id in todo]
        if run.edit_hparams is None:
            run.edit_hparams = getattr(edit, "hparams", None)
    t_edit = time.perf_counter() - t0
    cases = [(c, pre) for c, pre in unit if c.case_id in todo]
    gen = cfg.generation
    if edit is None:
        posts = [pre for _, pre in cases]
        post_gen = None
    else:
        if run.guard is not None:  # device copies of what this edit touches, for the check
            run.guard.protect(target_tensor(model, d.key) for d in getattr(edit, "deltas", ()))
        with edit.applied(model):
            posts = task.score(run.scorer, [c for c, _ in cases])
            post_gen = generate_cases(model, [c for c, _ in cases], gen, cfg.seed) if gen else None
    t_eval = time.perf_counter() - t0 - t_edit
    befores = run.cache.get_texts([c for c, _ in cases], gen, cfg.seed) if gen else []
    rows = []
    for i, ((case, pre), post) in enumerate(zip(cases, posts, strict=True)):
        row = {
            **task.fields(case),
            "unit_size": len(unit),
            "edit_seconds": t_edit / len(unit),
            "eval_seconds": t_eval / len(cases),
        }
        if edit is not None:  # the method's own split of the edit time (MEMIT: z vs layers)
            meta = getattr(edit, "metadata", {})
            row.update({k: meta[k] for k in ("seconds_targets", "seconds_layers") if k in meta})
        row.update(_prefixed("pre_", task.metrics(pre, pre)))
        row.update(_prefixed("post_", task.metrics(post, pre)))
        if gen:
            before = befores[i]
            after = before if post_gen is None else post_gen[i]
            row.update(
                pre_fluency=fluency(before["texts"]),
                post_fluency=fluency(after["texts"]),
                gen_source=before["source"],
                pre_texts=before["texts"],
                post_texts=after["texts"],
            )
        rows.append(row)
    return rows


def evaluate(
    model: HookedModel,
    config: EvalConfig | None = None,
    *,
    edit_fn: EditFn | None = None,
    scorer: Scorer | None = None,
    **settings: Any,
) -> EvalSummary:
    """Evaluate ``config.method`` on the first ``config.n`` usable cases of
    ``config.dataset``; see the module docstring for what is written where. Keyword
    ``settings`` are :class:`EvalConfig` fields (``evaluate(model, method="memit", n=10)``)
    replacing those of ``config``. ``edit_fn`` replaces :func:`editing.api.make_edit` (same
    signature; its hyper-parameters are then passed through as given) and ``scorer`` the
    model scorer. The model's weights are restored after every unit and checked
    (:class:`~editing.edits.weights.WeightsGuard`: the tensors each edit touched on their device,
    every block tensor before and after the run): a leak raises RuntimeError. Returns the
    :class:`EvalSummary` (also written)."""
    cfg = replace(config or EvalConfig(), **settings)
    cfg.check()
    t_start = time.perf_counter()
    label, task, cases = load_cases(cfg.dataset)
    cases = split_cases(label, cases, cfg.split)
    unit_size = cfg.batch if cfg.is_joint and cfg.method != NO_EDIT else 1
    hp: Any = None
    if cfg.method != NO_EDIT:
        if edit_fn is None:  # resolved in full, so a resumed run notices changed defaults
            hp = resolve_hparams(model, cfg.method, cfg.hparams, cfg.layers)
        elif isinstance(cfg.hparams, str | Path):
            hp = get_method(cfg.method).load_hparams(model_name(model), cfg.hparams)
        else:
            hp = cfg.hparams
    scorer = scorer or ModelScorer(model)
    filtered = cfg.only_known and task.kind == "counterfact"
    run_dir = Path(cfg.out_dir) / (cfg.name or f"{label}_{cfg.method}")
    run_dir.mkdir(parents=True, exist_ok=True)
    guard = WeightsGuard(model)  # the one full read before the run (one more after it)
    wkey = weights_key(model, reuse=True)  # the guard has just read every tensor
    wkey += "_chat" if chat_template_on(model) else ""  # other prompts
    settings_record = {
        "dataset": str(cfg.dataset),
        "label": label,
        "method": cfg.method,
        "model": model_name(model),
        "weights": wkey,
        "hparams": hparams_dict(hp),
        "layers": list(cfg.layers) if cfg.layers is not None else None,
        "only_known": filtered,
        "known_rule": cfg.known_rule,
        "seed": cfg.seed,
        "split": cfg.split,
        "unit_size": unit_size,
        "joint": cfg.is_joint,
        "generation": asdict(cfg.generation) if cfg.generation else None,
    }
    check_run(run_dir / "run.json", settings_record)
    cache = UneditedCache(Path(cfg.out_dir) / f"unedited_{label}_{wkey}.jsonl", task, scorer, model)
    here = ranks()  # under torchrun: rank 0 fills the unedited cache, the others read it
    selected, skipped, n_unknown = main_first(
        lambda: select_cases(
            model,
            task,
            cases,
            cfg.n,
            filtered,
            cfg.known_rule,
            cache,
            progress=cfg.progress and here.is_main,
        )
    )
    if not selected:
        raise InvalidInput(
            f"no usable case in {label}: {len(skipped)} skipped, {n_unknown} not known by the model"
        )
    jsonl = run_dir / "cases.jsonl"
    done = read_done(run_dir)
    units = [selected[i : i + unit_size] for i in range(0, len(selected), unit_size)]
    todo_units = [u for u in units if any(c.case_id not in done for c, _ in u)]
    run = _Run(model, cfg, task, scorer, cache, hp, edit_fn or make_edit, guard=guard)
    if edit_fn is None and unit_size > 1 and get_method(cfg.method).batched:
        run.target_cache = run_dir / "targets"
    gen = cfg.generation
    if gen:  # every unedited text in one batched run, before any edit
        pending = [c for u in todo_units for c, _ in u if c.case_id not in done]
        main_first(lambda: cache.get_texts(pending, gen, cfg.seed))
    # torchrun: per-case methods split the units across ranks, each appending to its own
    # file; a joint unit (MEMIT's batch) runs on every rank with its z optimisation sharded,
    # and rank 0 writes its rows.
    out: Path | None = jsonl
    mine = todo_units
    if here.world > 1 and unit_size == 1:
        mine, out = here.shard(todo_units), rank_rows_path(run_dir, here)
    else:
        run.shard_targets = here.world > 1 and edit_fn is None
        out = jsonl if here.is_main else None

    def evaluate_share() -> None:
        bar = tqdm(mine, desc=f"eval {cfg.method}", disable=not cfg.progress or not here.is_main)
        for unit in bar:
            todo = {c.case_id for c, _ in unit if c.case_id not in done}
            rows = _run_unit(run, unit, todo)
            guard.check(f"evaluating cases {sorted(todo)}")
            if out is not None:
                append_rows(out, rows)
            done.update({r["case_id"]: r for r in rows})

    together(evaluate_share)
    guard.finish(f"the evaluation in {run_dir}")
    if here.world > 1:
        run.edit_hparams = next((h for h in gather_objects(run.edit_hparams) if h), None)
        barrier()
        if not here.is_main:  # rank 0 merges the rows and writes the summary
            theirs: EvalSummary = gather_objects(cast(Any, None))[0]
            return theirs
        done = merge_rank_rows(run_dir)
    summary = finish_run(
        cfg, model, label, task, run.edit_hparams, run_dir, selected, done, unit_size, hp
    )
    summary.n_requested, summary.n_skipped, summary.n_unknown = cfg.n, len(skipped), n_unknown
    summary.skipped = skipped
    summary.seconds_total = time.perf_counter() - t_start
    if len(selected) < cfg.n:
        summary.notes.append(f"only {len(selected)} of the {cfg.n} requested cases are usable")
    write_json_atomic(run_dir / "summary.json", summary.to_dict())
    write_text_atomic(run_dir / "summary.md", summary.markdown())
    if here.world > 1:
        gather_objects(summary)
    return summary
