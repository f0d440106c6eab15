"""The layer sweep of Hase et al. 2023 ("Does Localization Inform Editing?"): edit each of N
CounterFact facts with ROME at every layer (or a chosen list), score every edit, and put
each (fact, layer) beside the fact's causal-tracing effect at that layer.

``run_layer_sweep(model, SweepConfig(n=10, layers=[0, 2, 4], out_dir="sweep"))``:

1. Cases are chosen as ``factscope eval`` chooses them (:mod:`~.tasks`: loading and split;
   :func:`~.cases.select_cases`: usable, known to the unedited model, no conflicts), except
   that "known" means top-1 by default (:class:`SweepConfig`).
2. Each fact is traced once (:func:`tracing.trace.trace_fact`, exact, kinds ``resid`` and
   ``mlp`` with their default windows, answer: the true target) and the trace saved under
   ``traces/<case_id>.json``. Its *effect* at layer L is the indirect effect
   ``p_restored − p_corrupted`` of the state restored at the subject's last token (Meng et
   al.'s site, Hase et al.'s choice) and, beside it, the largest over the subject's tokens.
3. For each layer: ROME's edit at that layer (the method's hyper-parameters with ``layer``
   replaced, through :func:`editing.api.make_edit`, statistics of every swept layer collected
   in one pass up front), scored with the evaluation's own task scoring on the edited model,
   then undone (the weights are checked bit for bit after every fact). A row holds the
   evaluation's ``pre_*``/``post_*`` metrics, Hase et al.'s rewrite score
   ``(p_new_after − p_new_before) / (1 − p_new_before)`` on the edit prompt (p: ROME's
   P(target), the exponentiated mean token log-probability), and the tracing effects.

The run folder holds ``sweep.json`` (the settings: a rerun with others is refused),
``rows.jsonl`` (one line per (fact, layer), appended as each is done: a rerun skips them),
``traces/``, ``unedited.jsonl`` (the unedited scores), and at the end ``rows.csv``,
``summary.json`` and ``summary.md`` (:mod:`~.sweep_analysis`). Bad settings are refused
before the model does any work: layers outside the model or with no path to ROME's loss by
ROME's own validation, an existing folder that is not a sweep by :func:`check_sweep_folder`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from editing.api import HparamsLike, make_edit, resolve_hparams
from editing.edits.edit import Edit
from editing.edits.weights import WeightsGuard, weights_key
from editing.evaluation.cases import UneditedCache, case_seed, select_cases
from editing.evaluation.results import append_rows, write_csv
from editing.evaluation.runner import check_run
from editing.evaluation.scoring import ModelScorer, Scorer, space_target
from editing.evaluation.sweep_analysis import markdown_table, summarize
from editing.evaluation.tasks import KNOWN_RULES, SPLITS, Case, Task, load_cases, split_cases
from editing.params import target_tensor
from editing.statistics.stats import layer_second_moments
from tracing.errors import EditFailed, InvalidInput, InvalidRequest
from tracing.io import write_json_atomic, write_text_atomic
from tracing.layers import parse_layers
from tracing.models import HookedModel, fingerprint, model_name, n_layers
from tracing.noise import DEFAULT_NOISE
from tracing.results import TraceResult
from tracing.trace import trace_fact, trace_settings

log = logging.getLogger(__name__)

METHOD = "rome"
#: The kinds traced; their effects at the edited layer go into every row.
TRACE_KINDS = ("resid", "mlp")
SETTINGS_FILE, ROWS_FILE = "sweep.json", "rows.jsonl"
#: Replaces :func:`editing.api.make_edit` in tests (same signature).
EditFn = Callable[..., Edit]


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep. ``layers``: the layers to edit (a list or the layer
    grammar, ``"0-17"``; None: every layer ROME can edit on the model). ``hparams``: ROME's
    hyper-parameters (object, dict of overrides, JSON path; None: the model's defaults), the
    layer replaced by each swept one. ``dataset``, ``split``, ``only_known``, ``known_rule``
    and ``seed`` mean what they mean for ``factscope eval``; ``samples``, ``noise`` and
    ``trace_seed`` are the trace's (:func:`tracing.trace.trace_fact`). Unlike ``factscope
    eval``, the sweep's default ``known_rule`` is ``top1``: a fact the model only *prefers*
    (P(true) > P(new)) usually has P(true) near zero on a small model (Gemma-3-270M: below 1e-3
    for 7 of the first 12 such facts), so its trace has no effect to relate edits to."""

    dataset: str | Path = "counterfact"
    n: int = 10
    layers: Sequence[int] | str | None = None
    hparams: HparamsLike = None
    out_dir: str | Path = "layer_sweep"
    split: str = "eval"
    only_known: bool = True
    known_rule: str = "top1"
    seed: int = 0
    samples: int = 10
    noise: str | float = DEFAULT_NOISE
    trace_seed: int = 1
    progress: bool = True

    def check(self) -> None:
        """Refuse what can be refused without a model (layers are parsed, not yet checked
        against the model)."""
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InvalidInput(f"n must be at least 1 (got {self.n!r})")
        if self.split not in SPLITS:
            raise InvalidInput(f"unknown split {self.split!r}; expected one of {SPLITS}")
        if self.known_rule not in KNOWN_RULES:
            raise InvalidInput(f"unknown known_rule {self.known_rule!r}; expected {KNOWN_RULES}")
        if self.layers is not None:
            parse_layers(self.layers)
        check_sweep_folder(self.out_dir)


def check_sweep_folder(folder: str | Path) -> Path:
    """``folder`` as a sweep's run folder: new, empty, or one a sweep made (it holds
    ``sweep.json``); a file or a folder with other contents is refused."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"{path} is an existing file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / SETTINGS_FILE).is_file():
        raise InvalidInput(
            f"{path} exists and is not a layer-sweep folder (no {SETTINGS_FILE}): choose a new "
            "or empty folder"
        )
    return path


def sweep_layers(model: HookedModel, config: SweepConfig) -> dict[int, Any]:
    """ROME's hyper-parameters for each swept layer, each checked by ROME's own validation
    (a layer outside the model, or one with no attention between it and the loss, raises
    before any work). With ``layers=None``: every layer that passes it."""
    if config.layers is not None:
        return {L: resolve_hparams(model, METHOD, config.hparams, [L]) for L in _layers(config)}
    out = {}
    for L in range(n_layers(model)):
        try:
            out[L] = resolve_hparams(model, METHOD, config.hparams, [L])
        except InvalidInput as exc:
            log.info("layer %d left out: %s", L, exc)
    if not out:
        raise InvalidInput("ROME can edit no layer of this model with these hyper-parameters")
    return out


def _layers(config: SweepConfig) -> list[int]:
    return [] if config.layers is None else parse_layers(config.layers)


def rewrite_score(p_before: float, p_after: float) -> float | None:
    """Hase et al.'s rewrite score: the share of the probability the new target lacked that
    the edit gave it, ``(p_after − p_before) / (1 − p_before)`` (1: the new target is
    certain; 0: unchanged; negative: less likely). ``None`` where ``p_before`` is 1."""
    return None if p_before >= 1.0 else (p_after - p_before) / (1.0 - p_before)


def trace_effects(trace: TraceResult, layer: int) -> dict[str, float]:
    """``trace_<kind>``: the indirect effect ``p_restored − p_corrupted`` of ``kind``
    restored at the subject's last token at ``layer``; ``trace_<kind>_max``: the largest over
    the subject's tokens; for every traced kind."""
    start, end = trace.subject_span
    out = {}
    for kind in trace.scores:
        effect = trace.indirect_effect(kind)[:, layer]
        out[f"trace_{kind}"] = float(effect[end - 1])
        out[f"trace_{kind}_max"] = float(np.max(effect[start:end]))
    return out


def read_sweep_rows(folder: str | Path) -> list[dict]:
    """The rows of a sweep folder, in file order. A torn last line (a run killed while
    writing it) is dropped from the file, so appending after it starts a clean line."""
    path = Path(folder) / ROWS_FILE
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        write_text_atomic(path, text)
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # pragma: no cover - only a torn line, dropped above
            continue
    return rows


def _fact_trace(model: HookedModel, case: Case, folder: Path, options: dict) -> TraceResult:
    """The fact's trace: read from ``folder`` if a run of this sweep saved it, else traced
    (towards the true target) and saved."""
    path = folder / f"{case.case_id:05d}.json"
    if path.is_file():
        return TraceResult.load(path)
    rec = case.record
    result = trace_fact(model, rec.prompt, rec.subject, space_target(rec.target_true), **options)
    result.save(path)
    return result


def _sweep_row(
    model: HookedModel,
    task: Task,
    scorer: Scorer,
    case: Case,
    pre: Any,
    layer: int,
    hp: Any,
    edit_fn: EditFn,
    extra: Mapping[str, Any],
    seed: int,
    guard: WeightsGuard,
) -> dict:
    """Edit ``case`` at ``layer``, score it, undo; its row (without the trace effects).
    ``guard`` keeps a device copy of what the edit touches, for its check after the row."""
    fields = {**task.fields(case), "layer": layer}
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case_seed(seed, case.case_id))
        try:
            edit = edit_fn(model, [task.request(case)], METHOD, hp, progress=False, **extra)
        except (InvalidRequest, EditFailed) as exc:
            log.warning("edit of case %d at layer %d failed: %s", case.case_id, layer, exc)
            return {**fields, "failed": str(exc)}
    t_edit = time.perf_counter() - t0
    guard.protect(target_tensor(model, d.key) for d in getattr(edit, "deltas", ()))
    with edit.applied(model):
        (post,) = task.score(scorer, [case])
    before, after = task.metrics(pre, pre), task.metrics(post, pre)
    p0, p1 = before["rewrite_p_new"], after["rewrite_p_new"]
    return {
        **fields,
        "edit_seconds": t_edit,
        "eval_seconds": time.perf_counter() - t0 - t_edit,
        **{f"pre_{k}": v for k, v in before.items()},
        **{f"post_{k}": v for k, v in after.items()},
        "rewrite_score": None if p0 is None or p1 is None else rewrite_score(p0, p1),
    }


def run_layer_sweep(
    model: HookedModel,
    config: SweepConfig,
    *,
    edit_fn: EditFn | None = None,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep described by ``config``; see the module docstring for what
    is computed and written. ``edit_fn`` replaces :func:`editing.api.make_edit` (same
    signature), ``scorer`` the model scorer. Returns the summary
    (:func:`~.sweep_analysis.summarize` of this run's rows, also written)."""
    config.check()
    hps = sweep_layers(model, config)
    layers = sorted(hps)
    trace_options: dict[str, Any] = dict(
        kinds=TRACE_KINDS, samples=config.samples, noise=config.noise, seed=config.trace_seed
    )
    traced, _ = trace_settings(model, **trace_options)
    label, task, cases = load_cases(config.dataset)
    if task.kind != "counterfact":
        raise InvalidInput(f"a layer sweep needs CounterFact-shaped cases, not {task.kind}")
    cases = split_cases(label, cases, config.split)
    hp_record = {k: v for k, v in hps[layers[0]].to_dict().items() if k != "layer"}
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "kind": "layer-sweep",
        "method": METHOD,
        "model": model_name(model),
        "fingerprint": fingerprint(model),
        "weights": weights_key(model),
        "hparams": hp_record,
        "layers": layers,
        "dataset": str(config.dataset),
        "label": label,
        "split": config.split,
        "only_known": config.only_known,
        "known_rule": config.known_rule,
        "seed": config.seed,
        "trace": asdict(traced),
    }
    check_run(run_dir / SETTINGS_FILE, json.loads(json.dumps(settings)))  # as JSON reads back
    scorer = scorer or ModelScorer(model)
    cache = UneditedCache(run_dir / "unedited.jsonl", task, scorer, model)
    selected, skipped, n_unknown = select_cases(
        model,
        task,
        cases,
        config.n,
        config.only_known,
        config.known_rule,
        cache,
        progress=config.progress,
    )
    if not selected:
        raise InvalidInput(
            f"no usable case in {label}: {len(skipped)} skipped, {n_unknown} not known by the model"
        )
    done = {(int(r["case_id"]), int(r["layer"])): r for r in read_sweep_rows(run_dir)}
    todo = [(c, pre, L) for c, pre in selected for L in layers if (c.case_id, L) not in done]
    extra: dict[str, Any] = {}
    if todo and edit_fn is None:  # C = E[k kᵀ] of every swept layer, in one pass
        hp = hps[layers[0]]
        stats = layer_second_moments(
            model,
            layers,
            n_tokens=hp.mom2_n_tokens,
            corpus=hp.corpus,
            dtype=hp.mom2_dtype,
            progress=config.progress,
        )
        extra["stats"] = stats
    edit = edit_fn or make_edit
    traces: dict[int, TraceResult] = {}
    guard = WeightsGuard(model)  # one full read now and one at the end, none per row
    for case, pre, layer in tqdm(todo, desc="layer sweep", disable=not config.progress):
        if case.case_id not in traces:
            traces[case.case_id] = _fact_trace(model, case, run_dir / "traces", trace_options)
        trace = traces[case.case_id]
        row = _sweep_row(
            model, task, scorer, case, pre, layer, hps[layer], edit, extra, config.seed, guard
        )
        row.update(
            trace_effects(trace, layer), p_clean=trace.p_clean, p_corrupted=trace.p_corrupted
        )
        guard.check(f"case {case.case_id} at layer {layer}")
        append_rows(run_dir / ROWS_FILE, [row])
        done[(case.case_id, layer)] = row
    guard.finish("the layer sweep")
    rows = [done[(c.case_id, L)] for c, _ in selected for L in layers]
    counts = {"n_requested": config.n, "n_skipped": len(skipped), "n_unknown": n_unknown}
    return write_sweep_report(run_dir, rows, counts)


def write_sweep_report(
    folder: str | Path, rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``rows.csv``, ``summary.json`` (the :func:`~.sweep_analysis.summarize` of
    ``rows``, with ``extra`` added) and ``summary.md`` into ``folder``; returns the summary."""
    run_dir = Path(folder)
    summary = {**summarize(rows), **(extra or {})}
    summary["files"] = {k: str(run_dir / f) for k, f in FILES.items()}
    write_csv(run_dir / "rows.csv", list(rows))
    write_json_atomic(run_dir / "summary.json", summary)
    write_text_atomic(run_dir / "summary.md", markdown_table(summary))
    return summary


#: What a finished sweep folder holds (the CLI adds ``layer_sweep.png``).
FILES = {
    "settings": SETTINGS_FILE,
    "rows": ROWS_FILE,
    "csv": "rows.csv",
    "summary": "summary.json",
    "table": "summary.md",
    "traces": "traces",
}


def rewrite_report(folder: str | Path) -> dict[str, Any]:
    """Redo the summary, table and CSV of a sweep folder from its rows, without a model: the
    rows of the cases of its last ``summary.json`` (that run's selection) when there is one,
    else every row. Refuses a folder that is not a sweep or has no rows."""
    run_dir = Path(folder)
    if not (run_dir / SETTINGS_FILE).is_file():
        raise InvalidInput(f"{run_dir} is not a layer-sweep folder (no {SETTINGS_FILE})")
    rows = read_sweep_rows(run_dir)
    if not rows:
        raise InvalidInput(f"{run_dir} holds no sweep rows yet: run the sweep first")
    old: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        old = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        keep = set(old.get("case_ids", []))
        rows = [r for r in rows if int(r["case_id"]) in keep] if keep else rows
    counts: dict[str, Any] = {
        k: old[k] for k in ("n_requested", "n_skipped", "n_unknown") if k in old
    }
    return write_sweep_report(run_dir, rows, counts)
