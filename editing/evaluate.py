"""The evaluation runner: edit CounterFact / zsRE cases with a method, score them before and
after, write rows, a summary and tables; resumable.

``evaluate(model, "counterfact", "rome", n=100, out_dir="results/")`` loads the cases, keeps
(optionally) those whose true target the unedited model prefers, skips and counts cases whose
subject is missing from the prompt, edits one case at a time (ROME, FT methods) or ``batch``
cases at once (MEMIT; every method with ``joint=True``), scores every metric of
:mod:`editing.metrics` on the edited model, undoes the edit, and writes under
``out_dir/<dataset>_<method>/``: ``cases.jsonl`` (one row per case, appended as it goes, so an
interrupted run resumes where it stopped), ``cases.csv``, ``summary.json``, ``summary.md`` and
``run.json`` (the settings, checked on resume). Unedited scores and generated texts are cached
in ``out_dir/unedited_<dataset>_<weights>.jsonl`` and shared by every method's run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from editing.eval_cases import (
    KNOWN_RULES,
    Case,
    UneditedCache,
    case_fields,
    case_metrics,
    case_seed,
    generate_cases,
    load_cases,
    request_for,
    score_cases,
    select_cases,
    weights_checksums,
    weights_key,
)
from editing.eval_results import (
    EvalSummary,
    append_rows,
    read_rows,
    scaling_point,
    split_prefixed,
    write_csv,
)
from editing.generation import GenerationSettings
from editing.metrics import ModelScorer, Scorer, aggregate, fluency
from tracing.models import fingerprint

log = logging.getLogger(__name__)

METHODS = ("rome", "memit", "ft-l", "ft", "mixed", "none")


def _default_edit_fn() -> Callable:
    from editing.api import make_edit

    return make_edit


def _resolve_hparams(method: str, hparams: Any, model, layers, default_method: bool) -> Any:
    """The hyper-parameters a run uses. With the real editing methods they are resolved in
    full (shipped defaults, file, overrides, layers), so a resumed run notices when e.g. the
    shipped defaults changed; a custom ``edit_fn`` gets ``hparams`` as given (a path read)."""
    if default_method:
        from editing.api import resolve_hparams

        return resolve_hparams(model, method, hparams, layers)
    if isinstance(hparams, (str, Path)):
        from editing.edit import model_name
        from editing.hparams import load_hparams

        return load_hparams(method, model_name(model), path=hparams)
    return hparams


def _hparams_dict(hp: Any) -> dict | None:
    if hp is None:
        return None
    return hp.to_dict() if hasattr(hp, "to_dict") else dict(hp)


def _edited_layers(hp: Any) -> list[int] | None:
    """The layers an edit with hyper-parameters ``hp`` changes (None without hparams)."""
    if hp is None:
        return None
    layers = hp.get("layers") if isinstance(hp, dict) else getattr(hp, "layers", None)
    return list(layers) if layers is not None else None


def _check_run(path: Path, settings: dict) -> None:
    """Refuse to resume a run folder made with other settings (``n`` may differ)."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{path.parent} holds a run with other settings ({', '.join(diff)} differ): "
                "choose another output folder or name, or delete it"
            )
    else:
        path.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def _run_unit(ctx: dict, unit: list[tuple[Case, Any]], todo: set[int]) -> list[dict]:
    """Edit one unit's cases, score those in ``todo`` on the edited model, undo; rows."""
    model, method, gen, seed = ctx["model"], ctx["method"], ctx["generation"], ctx["seed"]
    t0 = time.perf_counter()
    edit = None
    if method != "none":
        requests = [request_for(c) for c, _ in unit]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case_seed(seed, unit[0][0].case_id))
            try:
                edit = ctx["edit_fn"](
                    model, requests, method, ctx["hparams"], layers=ctx["layers"], progress=False
                )
            except ValueError as exc:
                log.warning("edit of cases %s failed: %s", [c.case_id for c, _ in unit], exc)
                return [
                    {**case_fields(c), "failed": str(exc)} for c, _ in unit if c.case_id in todo
                ]
        if ctx.get("edit_hparams") is None:
            ctx["edit_hparams"] = getattr(edit, "hparams", None)
    t_edit = time.perf_counter() - t0
    cases = [(c, pre) for c, pre in unit if c.case_id in todo]
    if edit is None:
        posts = [pre for _, pre in cases]
        post_gen = None
    else:
        with edit.applied(model):
            posts = score_cases(ctx["scorer"], [c for c, _ in cases])
            post_gen = generate_cases(model, [c for c, _ in cases], gen, seed) if gen else None
    t_eval = time.perf_counter() - t0 - t_edit
    befores = ctx["cache"].get_texts([c for c, _ in cases], gen, seed) if gen else []
    rows = []
    for i, ((case, pre), post) in enumerate(zip(cases, posts, strict=True)):
        row = {
            **case_fields(case),
            "unit_size": len(unit),
            "edit_seconds": t_edit / len(unit),
            "eval_seconds": t_eval / len(cases),
        }
        row.update(_prefixed("pre_", case_metrics(pre, pre)))
        row.update(_prefixed("post_", case_metrics(post, pre)))
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
    model,
    dataset: str | Path = "counterfact",
    method: str = "rome",
    *,
    n: int = 200,
    batch: int = 100,
    layers: Sequence[int] | None = None,
    hparams: Any = None,
    out_dir: str | Path = "results",
    only_known: bool = True,
    known_rule: str = "prefers",
    seed: int = 0,
    progress: bool = True,
    joint: bool | None = None,
    generation: GenerationSettings | None = GenerationSettings(),  # noqa: B008 (frozen)
    name: str | None = None,
    edit_fn: Callable | None = None,
    scorer: Scorer | None = None,
) -> EvalSummary:
    """Evaluate ``method`` on the first ``n`` usable cases of ``dataset``; see the module
    docstring for what is written where. Returns the :class:`EvalSummary` (also written).

    ``method``: rome, memit, ft-l, ft, mixed or none (the unedited model). ``joint``: edit
    ``batch`` cases at once (default: only for MEMIT). ``hparams``: a hyper-parameter object,
    a JSON path, or None (the method's defaults for this model); ``layers`` overrides the
    edited layers. ``only_known`` keeps CounterFact cases whose true target the unedited model
    prefers (``known_rule``: ``prefers`` or ``top1``, see :func:`is_known`). ``generation``:
    fluency settings (None: no fluency). ``edit_fn`` replaces :func:`editing.api.make_edit`
    (same signature) and ``scorer`` the model scorer. The model's weights are restored after
    every unit and checked: a leak raises RuntimeError.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be at least 1 (got n={n}, batch={batch})")
    if known_rule not in KNOWN_RULES:
        raise ValueError(f"unknown known_rule {known_rule!r}; expected one of {KNOWN_RULES}")
    t_start = time.perf_counter()
    label, cases = load_cases(dataset)
    joint = (method == "memit") if joint is None else bool(joint)
    unit_size = batch if joint and method != "none" else 1
    hp = None
    if method != "none":
        hp = _resolve_hparams(method, hparams, model, layers, default_method=edit_fn is None)
        edit_fn = edit_fn or _default_edit_fn()
    scorer = scorer or ModelScorer(model)
    filtered = only_known and cases[0].kind == "counterfact"
    run_dir = Path(out_dir) / (name or f"{label}_{method}")
    run_dir.mkdir(parents=True, exist_ok=True)
    wkey = weights_key(model)
    from editing.edit import model_name

    settings = {
        "dataset": str(dataset),
        "method": method,
        "model": model_name(model),
        "weights": wkey,
        "hparams": _hparams_dict(hp),
        "layers": list(layers) if layers is not None else None,
        "only_known": filtered,
        "known_rule": known_rule,
        "seed": seed,
        "unit_size": unit_size,
        "joint": joint,
        "generation": asdict(generation) if generation else None,
    }
    _check_run(run_dir / "run.json", settings)
    cache = UneditedCache(Path(out_dir) / f"unedited_{label}_{wkey}.jsonl", scorer, model)
    selected, skipped, n_unknown = select_cases(model, cases, n, filtered, known_rule, cache)
    if not selected:
        raise ValueError(
            f"no usable case in {label}: {len(skipped)} skipped, {n_unknown} not known by the model"
        )
    jsonl = run_dir / "cases.jsonl"
    done = read_rows(jsonl)
    units = [selected[i : i + unit_size] for i in range(0, len(selected), unit_size)]
    todo_units = [u for u in units if any(c.case_id not in done for c, _ in u)]
    ctx = {
        "model": model,
        "method": method,
        "generation": generation,
        "seed": seed,
        "edit_fn": edit_fn,
        "hparams": hp,
        "layers": list(layers) if layers else None,
        "scorer": scorer,
        "cache": cache,
        "edit_hparams": None,
    }
    if generation:  # every unedited text in one batched run, before any edit
        pending = [c for u in todo_units for c, _ in u if c.case_id not in done]
        cache.get_texts(pending, generation, seed)
    checks = weights_checksums(model)
    for unit in tqdm(todo_units, desc=f"eval {method}", disable=not progress):
        todo = {c.case_id for c, _ in unit if c.case_id not in done}
        rows = _run_unit(ctx, unit, todo)
        if weights_checksums(model) != checks:
            raise RuntimeError(f"model weights changed after evaluating cases {sorted(todo)}")
        append_rows(jsonl, rows)
        done.update({r["case_id"]: r for r in rows})
    hp_file = run_dir / "hparams.json"
    if ctx["edit_hparams"] is not None:
        hp_file.write_text(json.dumps(ctx["edit_hparams"], indent=1), encoding="utf-8")
    resolved = json.loads(hp_file.read_text(encoding="utf-8")) if hp_file.exists() else None
    rows = [done[c.case_id] for c, _ in selected]
    ok = [r for r in rows if "failed" not in r]
    write_csv(run_dir / "cases.csv", rows)
    edit_s = [r["edit_seconds"] for r in ok]
    summary = EvalSummary(
        dataset=label,
        method=method,
        model=model_name(model),
        fingerprint=fingerprint(model),
        n=len(ok),
        n_requested=n,
        n_skipped=len(skipped),
        n_unknown=n_unknown,
        n_failed=len(rows) - len(ok),
        only_known=filtered,
        known_rule=known_rule,
        seed=seed,
        batch=unit_size,
        joint=joint,
        layers=list(layers) if layers is not None else _edited_layers(hp),
        hparams=resolved if resolved is not None else settings["hparams"],
        edited=aggregate(split_prefixed(ok, "post_")),
        unedited=aggregate(split_prefixed(ok, "pre_")),
        seconds_per_edit=sum(edit_s) / len(edit_s) if edit_s and method != "none" else None,
        seconds_per_case=(
            sum(r["edit_seconds"] + r["eval_seconds"] for r in ok) / len(ok) if ok else None
        ),
        seconds_total=time.perf_counter() - t_start,
        seconds_per_edit_median=(
            statistics.median(edit_s) if edit_s and method != "none" else None
        ),
        generation=None
        if not generation
        else {
            **asdict(generation),
            "sources": {
                src: sum(r.get("gen_source") == src for r in ok) for src in ("record", "subject")
            },
        },
        skipped=skipped,
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
        notes=_notes(filtered, label, cases[0].kind, known_rule)
        + (
            [f"only {len(selected)} of the {n} requested cases are usable"]
            if len(selected) < n
            else []
        ),
    )
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1), "utf-8")
    (run_dir / "summary.md").write_text(summary.markdown(), encoding="utf-8")
    return summary


def _notes(filtered: bool, label: str, kind: str, rule: str) -> list[str]:
    notes = []
    if filtered:
        notes.append(f"only cases the unedited model knows (rule {rule!r})")
    if kind == "counterfact":
        notes.append(
            "ROME's reference score (tf-idf consistency) is not computed: ROME's "
            "tf-idf files are not available here"
        )
    return notes


def scaling(
    model,
    methods: Sequence[str] = ("memit", "ft-l"),
    sizes: Sequence[int] = (1, 10, 100),
    *,
    dataset: str | Path = "counterfact",
    out_dir: str | Path = "results",
    generation: GenerationSettings | None = None,
    **kwargs: Any,
) -> list[dict]:
    """Metric against number of edits (the MEMIT paper's scaling curve): for each method and
    size N, edit N cases at once (``joint``; ROME: N sequential edits combined) and score
    them. Returns plain points for :func:`viz.plots.plot_scaling` (one ``"unedited"`` point
    per size too) and writes them to ``out_dir/scaling/points.json``. Other keyword arguments
    go to :func:`evaluate` (layers, hparams, only_known, seed, progress, edit_fn, ...)."""
    points: list[dict] = []
    root = Path(out_dir) / "scaling"
    for size in sizes:
        for method in methods:
            s = evaluate(
                model,
                dataset,
                method,
                n=size,
                batch=size,
                joint=True,
                out_dir=root,
                name=f"{method}_x{size}",
                generation=generation,
                **kwargs,
            )
            points.append(scaling_point(s))
        points.append(scaling_point(s, edited=False))
    root.mkdir(parents=True, exist_ok=True)
    (root / "points.json").write_text(json.dumps(points, indent=1), encoding="utf-8")
    return points


def parse_layers(spec: str | Sequence[int] | None) -> list[int] | None:
    """Layers from ``"3-8"``, ``"2,4,6"``, ``"4"``, a list, or a JSON file holding a list or
    ``{"layers": [...]}`` (as ``select-layers`` writes); None stays None."""
    if spec is None or isinstance(spec, (list, tuple)):
        return None if spec is None else [int(x) for x in spec]
    text = str(spec).strip()
    if Path(text).suffix == ".json" or Path(text).is_file():
        data = json.loads(Path(text).read_text(encoding="utf-8"))
        data = data.get("layers") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f"{text}: expected a list of layers or {{'layers': [...]}}")
        return [int(x) for x in data]
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"cannot read layers from {spec!r}: use 3-8, 2,4,6 or a JSON file"
        ) from None
