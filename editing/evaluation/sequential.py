"""Sequential (lifelong) editing: batches applied one after another without undo, every edit
made so far scored at checkpoints, with the model's general ability beside it.

``evaluate_sequential(model, SequentialConfig(method="alphaedit", n=2000, batch=100))`` takes
the first ``n`` usable cases (as :func:`~editing.evaluation.runner.evaluate` selects them,
but keeping cases that repeat or contradict earlier ones), edits them ``batch`` at a time
into the same model, and after every ``checkpoint_every`` edits (and at the end) writes one
row to ``checkpoints.jsonl``: the task's metrics over every edit so far (efficacy,
paraphrase, neighbourhood, magnitudes, the strict metrics; ``unedited``: the same cases'
metrics before any edit), WikiText-2 perplexity on held-out
text and top-1 accuracy on known_1000 facts about subjects no edit touched
(:mod:`editing.evaluation.ability`), the largest weight magnitude and the time spent. Row 0
is the unedited model; it is kept in ``out_dir`` (``unedited_ability_*.json``, by weights,
held-out tokens and facts) for the other streams run on the same model there. Beside each
row, ``cases/NNNNN.jsonl`` (``NNNNN``: edits processed) keeps every edit's own metrics with
the batch it arrived in, so that whether early edits wear off or later ones take less can be
told apart (:mod:`editing.evaluation.arrival`).

Methods that protect earlier edits (``EditMethod.protects_edits``: AlphaEdit) get the keys
of every batch applied so far (``sum K^T K`` by layer, from ``Edit.keys``). Methods that carry
a state along the stream (``EditMethod.lifelong``: UltraEdit's normalisation statistics) get
the state the last applied batch left (its ``Edit.metadata["lifelong_state"]``), so a
resumed stream, rebuilt from the saved batches, continues from exactly that state.

Reliability:

* **Resumable.** Each batch's edit is saved (``batches/NNNNN``, :meth:`Edit.save`) and then
  recorded in ``stream.json``; a restarted run rebuilds the model by re-applying the saved
  edits in order (checked against the recorded weight digest) and goes on. Per-request
  targets of the batch in progress are kept in ``targets/``.
* **Finite weights.** A batch whose update is not finite, or whose application makes a
  weight non-finite, is refused: the model is left as it was, the batch is recorded as
  refused with the reason, and the stream goes on.
* **Conflicts.** A request that repeats or contradicts one already in the stream (same
  subject and template, or same subject and relation) is reported when its batch arrives and
  skipped: the earlier edit stands (``stream.json`` lists each with the reason).
* **Undo.** At the end the whole stream is undone in reverse order and the weights are
  checked to be bit for bit the original ones (``keep_edits=True`` leaves them applied).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from editing.api import HparamsLike, make_edit, resolve_hparams
from editing.edits.edit import Edit
from editing.edits.weights import weights_checksums, weights_key
from editing.evaluation.ability import (
    check_heldout,
    heldout_sequences,
    known_fact_accuracy,
    perplexity,
)
from editing.evaluation.cases import UneditedCache, select_cases
from editing.evaluation.metrics import aggregate
from editing.evaluation.results import append_rows, read_jsonl, write_jsonl
from editing.evaluation.runner import EditFn, check_run
from editing.evaluation.scoring import ModelScorer, Scorer
from editing.evaluation.tasks import KNOWN_RULES, SPLITS, Case, load_cases, split_cases
from editing.hparams import KeyValueHparams
from editing.methods import get_method
from editing.methods.ultraedit import STATE_KEY, make_stream_edit
from editing.requests import ConflictIndex
from tracing.errors import EditFailed, InvalidInput, InvalidRequest
from tracing.facts import known_facts, load_known_facts
from tracing.io import write_json_atomic
from tracing.models import HookedModel, model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequentialConfig:
    """A sequential run: ``n`` cases of ``dataset`` edited ``batch`` at a time with
    ``method``, scored every ``checkpoint_every`` edits; ``ppl_tokens`` held-out tokens for
    perplexity; ``facts``: the facts of the known-fact accuracy (a known_1000-shaped JSON;
    default the shipped known_1000). The other fields are
    :class:`~editing.evaluation.runner.EvalConfig`'s."""

    dataset: str | Path = "counterfact"
    method: str = "alphaedit"
    n: int = 2000
    batch: int = 100
    checkpoint_every: int = 500
    layers: Sequence[int] | None = None
    hparams: HparamsLike = None
    out_dir: str | Path = "results"
    name: str | None = None
    only_known: bool = True
    known_rule: str = "prefers"
    seed: int = 0
    split: str = "eval"
    ppl_tokens: int = 8192
    facts: str | Path | None = None
    progress: bool = True

    def check(self) -> None:
        """Refuse settings that cannot work, before any model is touched."""
        get_method(self.method)
        for name in ("n", "batch", "checkpoint_every", "ppl_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ppl_tokens < 128:
            raise InvalidInput(f"ppl_tokens must be at least 128, got {self.ppl_tokens}")
        if self.split not in SPLITS:
            raise InvalidInput(f"unknown split {self.split!r}; expected one of {SPLITS}")
        if self.known_rule not in KNOWN_RULES:
            raise InvalidInput(f"unknown known_rule {self.known_rule!r}; expected {KNOWN_RULES}")


class EditStream:
    """Edits applied one after another to one model: :meth:`push` applies (refusing
    non-finite results, model unchanged), :meth:`undo_all` undoes every edit in reverse, and
    :attr:`preserved` keeps ``sum K^T K`` of their keys by layer (float64) and
    :attr:`lifelong` the lifelong state the last edit left (None before any)."""

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        self.edits: list[Edit] = []
        self.preserved: dict[int, torch.Tensor] = {}
        self.lifelong: dict[str, Any] | None = None

    def push(self, edit: Edit) -> None:
        """Apply ``edit`` on top of the stream; EditFailed (weights unchanged) if the delta
        or the resulting weights are not finite."""
        try:
            edit.apply(self.model)
        except InvalidInput as exc:
            raise EditFailed(str(exc)) from exc
        bad = [L for L in edit.layers if not _finite(self.model.blocks[L].parameters())]
        if bad:
            edit.undo(self.model)
            raise EditFailed(f"applying the batch makes layers {bad} non-finite (refused)")
        self.edits.append(edit)
        for L, k in edit.keys.items():
            k = k.double()
            gram = k.T @ k
            self.preserved[L] = self.preserved[L] + gram if L in self.preserved else gram
        if STATE_KEY in edit.metadata:
            self.lifelong = edit.metadata[STATE_KEY]

    def undo_all(self) -> None:
        """Undo every edit, last first: the weights are the original ones bit for bit."""
        while self.edits:
            self.edits.pop().undo(self.model)
        self.preserved.clear()
        self.lifelong = None


@dataclass
class _Stream:
    """The run's state on disk: ``stream.json``."""

    path: Path
    batches: list[dict]

    @classmethod
    def read(cls, path: Path) -> _Stream:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        return cls(path, data.get("batches", []))

    def record(self, entry: dict) -> None:
        self.batches.append(entry)
        write_json_atomic(self.path, {"batches": self.batches})


def _scored_rows(task: Any, scorer: Scorer, cases: list[tuple[Case, Any]]) -> list[dict]:
    posts = task.score(scorer, [c for c, _ in cases]) if cases else []
    return [task.metrics(post, pre) for (_, pre), post in zip(cases, posts, strict=True)]


def run_folder(cfg: SequentialConfig, label: str | None = None) -> Path:
    """The run's folder: ``out_dir/<name>``, by default ``<dataset>_<method>_seq_b<batch>``."""
    if label is None:
        label = load_cases(cfg.dataset)[0]
    return Path(cfg.out_dir) / (cfg.name or f"{label}_{cfg.method}_seq_b{cfg.batch}")


def evaluate_sequential(
    model: HookedModel,
    config: SequentialConfig | None = None,
    *,
    edit_fn: EditFn | None = None,
    scorer: Scorer | None = None,
    keep_edits: bool = False,
    **settings: Any,
) -> list[dict]:
    """Run (or resume) the sequential evaluation of the module docstring; returns the
    checkpoint rows (also in ``checkpoints.jsonl`` of the run folder
    ``out_dir/<name or dataset_method_seq_bBATCH>``)."""
    cfg = replace(config or SequentialConfig(), **settings)
    cfg.check()
    spec = get_method(cfg.method)
    label, task, cases = load_cases(cfg.dataset)
    cases = split_cases(label, cases, cfg.split)
    hp = resolve_hparams(model, spec.name, cfg.hparams, cfg.layers)
    if isinstance(hp, KeyValueHparams):
        check_heldout(model, hp.mom2_n_tokens, hp.corpus)
    scorer = scorer or ModelScorer(model)
    run_dir = run_folder(cfg, label)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the one full read (digests are then kept per tensor: a batch's key reads what it changed)
    original, wkey = weights_checksums(model), weights_key(model, reuse=True)
    record = {**asdict(cfg), "out_dir": None, "progress": None}
    record.update(dataset=str(cfg.dataset), facts=None if cfg.facts is None else str(cfg.facts))
    record.update(label=label, model=model_name(model), weights=wkey, hparams=hp.to_dict())
    check_run(run_dir / "run.json", {k: v for k, v in record.items() if k != "n"})
    cache = UneditedCache(Path(cfg.out_dir) / f"unedited_{label}_{wkey}.jsonl", task, scorer, model)
    filtered = cfg.only_known and task.kind == "counterfact"
    selected, _, _ = select_cases(
        model,
        task,
        cases,
        cfg.n,
        filtered,
        cfg.known_rule,
        cache,
        skip_conflicts=False,
        progress=cfg.progress,
    )
    heldout = heldout_sequences(model, cfg.ppl_tokens)
    facts = known_facts(model, load_known_facts(cfg.facts))
    ability_key = json.dumps([cfg.ppl_tokens, [(f.prompt, f.subject, f.answer) for f in facts]])
    digest = hashlib.sha256(ability_key.encode()).hexdigest()[:16]
    row0_path = Path(cfg.out_dir) / f"unedited_ability_{wkey}_{digest}.json"
    batches = [selected[i : i + cfg.batch] for i in range(0, len(selected), cfg.batch)]
    stream_subjects = [task.request(c).subject for c, _ in selected]
    stream, state = EditStream(model), _Stream.read(run_dir / "stream.json")
    done_rows = {r["n_processed"]: r for r in read_jsonl(run_dir / "checkpoints.jsonl")}
    index, applied = ConflictIndex(), cast(list[tuple[Case, Any]], [])
    arrived: list[tuple[int, int]] = []  # each applied case's batch, requests processed after it
    t_run = time.perf_counter()

    def checkpoint(n_processed: int, seconds_edit: float) -> None:
        if n_processed in done_rows:
            return
        if n_processed == 0 and row0_path.exists():  # another stream on this model measured it
            row0 = json.loads(row0_path.read_text(encoding="utf-8"))
            append_rows(run_dir / "checkpoints.jsonl", [row0])
            done_rows[0] = row0
            return
        t0 = time.perf_counter()
        per_case = _scored_rows(task, scorer, applied)
        metrics = aggregate(per_case)
        unedited = aggregate([task.metrics(pre, pre) for _, pre in applied])
        subjects = [task.request(c).subject for c, _ in applied]
        acc, n_facts = known_fact_accuracy(model, facts, subjects) if facts else (None, 0)
        weights = [p for block in model.blocks for p in block.parameters()]
        biggest = max(float(w.abs().max()) for w in weights)
        row = {
            "n_processed": n_processed,
            "n_edits": len(applied),
            "metrics": metrics,
            "unedited": unedited,
            "perplexity": perplexity(model, heldout),
            "known_accuracy": acc,
            "known_facts": n_facts,
            "max_abs_weight": biggest,
            "finite": _finite(weights),
            "seconds_edit": round(seconds_edit, 2),
            "seconds_checkpoint": round(time.perf_counter() - t0, 2),
        }
        case_rows = [
            {"case_id": c.case_id, "batch": b, "arrived": at, **m}
            for (c, _), (b, at), m in zip(applied, arrived, per_case, strict=True)
        ]
        write_jsonl(run_dir / "cases" / f"{n_processed:05d}.jsonl", case_rows)
        append_rows(run_dir / "checkpoints.jsonl", [row])
        done_rows[n_processed] = row
        if n_processed == 0:
            write_json_atomic(row0_path, row)
        log.info("checkpoint after %d edits: %s", len(applied), row)

    checkpoint(0, 0.0)
    bar = tqdm(total=len(batches), desc=f"sequential {cfg.method}", disable=not cfg.progress)
    processed, seconds_edit = 0, 0.0
    for b, unit in enumerate(batches):
        take, clashing = [], []
        for c, pre in unit:
            req = task.request(c)
            problem = index.problem(req)
            if problem is None:
                index.add(req)
                take.append((c, pre))
            else:
                clashing.append(c.case_id)
                if b >= len(state.batches):
                    log.warning("batch %d: %s; skipped, the earlier edit stands", b, problem)
        if b < len(state.batches):  # done before: rebuild
            entry = state.batches[b]
            if entry["status"] == "applied":
                stream.push(Edit.load(run_dir / "batches" / f"{b:05d}"))
                applied += take
                if weights_key(model, reuse=True) != entry["weights"]:
                    log.warning("batch %d: rebuilt weights differ from the recorded ones", b)
            seconds_edit += entry.get("seconds", 0.0)
        else:
            t0 = time.perf_counter()
            entry = _edit_batch(
                model, run_dir, b, take, task, cfg, hp, spec, stream, edit_fn, stream_subjects
            )
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry["skipped_conflicts"] = clashing
            state.record(entry)
            seconds_edit += entry["seconds"]
            if entry["status"] == "applied":
                applied += take
        before, processed = processed, processed + len(unit)
        arrived += [(b, processed)] * (len(applied) - len(arrived))
        bar.update(1)
        last = b == len(batches) - 1
        if last or processed // cfg.checkpoint_every > before // cfg.checkpoint_every:
            checkpoint(processed, seconds_edit)
    bar.close()
    rows = [done_rows[k] for k in sorted(done_rows)]
    write_json_atomic(
        run_dir / "summary.json",
        {"settings": record, "checkpoints": rows, "seconds_total": time.perf_counter() - t_run},
    )
    if not keep_edits:
        stream.undo_all()
        if weights_checksums(model) != original:
            raise RuntimeError("undoing the stream did not restore the original weights")
    return rows


def _edit_batch(
    model: HookedModel,
    run_dir: Path,
    b: int,
    take: list[tuple[Case, Any]],
    task: Any,
    cfg: SequentialConfig,
    hp: Any,
    spec: Any,
    stream: EditStream,
    edit_fn: EditFn | None,
    stream_subjects: Sequence[str] = (),
) -> dict:
    """Compute, save and apply one batch; its ``stream.json`` entry. ``stream_subjects``:
    every subject of the stream, whose known facts a knowledge-aware AlphaEdit leaves out of
    its preserved set."""
    if not take:
        return {"index": b, "status": "empty", "cases": []}
    ids = [c.case_id for c, _ in take]
    extra: dict[str, Any] = {}
    if edit_fn is None and not spec.lifelong:
        extra["target_cache"] = run_dir / "targets"
        if spec.protects_edits and stream.preserved:
            extra["preserved_keys"] = stream.preserved
        if getattr(hp, "knowledge_share", None) is not None:  # AlphaEdit's knowledge-aware set
            extra["exclude_subjects"] = stream_subjects
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + ids[0])
            requests = [task.request(c) for c, _ in take]
            if edit_fn is None and spec.lifelong:
                edit = make_stream_edit(model, requests, hp, stream.lifelong)
            else:
                edit = (edit_fn or make_edit)(
                    model, requests, cfg.method, hp, progress=False, **extra
                )
        edit.save(run_dir / "batches" / f"{b:05d}")
        stream.push(edit)
    except (InvalidRequest, EditFailed) as exc:
        log.warning("batch %d refused (model unchanged): %s", b, exc)
        return {"index": b, "status": "refused", "reason": str(exc), "cases": ids}
    key = weights_key(model, reuse=True)  # reads the tensors this batch changed
    return {"index": b, "status": "applied", "cases": ids, "weights": key}


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (any block tensor may be edited)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
