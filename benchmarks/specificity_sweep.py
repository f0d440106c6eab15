"""Specificity sweep (issue 12, part 2): which hyper-parameter keeps an edit local?

Each named configuration is a method plus overrides of the shipped Gemma hyper-parameter files
(``editing/hparams_defaults/{rome,memit}_gemma-3-270m.json``). Every configuration is run
through the evaluation runner (:func:`editing.evaluation.evaluate`) on the same ``--n`` known
cases of CounterFact's *tuning* split with the rebuilt ten-prompt neighbourhoods (dataset
``counterfact``, label ``counterfact10``); ROME edits one case at a time, MEMIT all ``--n`` in one
batch. No fluency texts are generated (``--gen-tokens 0`` in ``factscope eval`` terms).

Overrides name fields as :func:`editing.hparams.read_hparams` takes them: top-level fields
(``layer``, ``layers``, ``mom2_n_tokens``, ``mom2_update_weight``, ``consistent_key``,
``context_templates``) or fields of the target optimisation (``kl_factor``,
``clamp_norm_factor``, ``weight_decay``, ``kl_position``, ...). A value written ``"x4"``
multiplies the shipped value by 4 (``{"kl_factor": "x16"}``).

Resumable: each configuration has its run folder ``<out>/<name>/`` (the runner resumes an
interrupted run case by case) and, once finished, one row in ``<out>/sweep.jsonl``; a rerun
skips the configurations that have a row (with the same method, overrides and n). It prints a
Markdown table (also written to ``<out>/sweep.md``) and draws neighbourhood-success drop against
paraphrase success (``--plot``, default ``docs/specificity_sweep.png``).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/specificity_sweep.py --n 30
    .venv/bin/python benchmarks/specificity_sweep.py --list
    .venv/bin/python benchmarks/specificity_sweep.py --only rome_default,rome_kl_x16
    .venv/bin/python benchmarks/specificity_sweep.py --add 'rome_mine:rome:kl_factor=x2;layer=3'
    .venv/bin/python benchmarks/specificity_sweep.py --report   # table and plot from the rows
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from matplotlib.figure import Figure

from editing.hparams import TargetHparams
from editing.methods import get_method
from tracing.errors import InvalidHparams, InvalidInput
from tracing.io import write_text_atomic

log = logging.getLogger("specificity_sweep")

MODEL = "gemma-3-270m"
UNEDITED = "unedited"


@dataclass(frozen=True)
class SweepConfig:
    """One row of the sweep: ``method`` (``rome``, ``memit`` or ``none``) with ``overrides`` of
    the model's shipped hyper-parameters (values ``"xF"`` scale the shipped value by ``F``);
    ``lever`` groups rows in the table, ``note`` says what the row tests. ``subject_weight``
    ``w`` > 0 (ROME): edit with ``(1 - w) C + w C_subj`` in place of the corpus statistics
    ``C``, where ``C_subj`` is the second moment of subject-final keys of other subjects
    (:func:`subject_key_moment`)."""

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    lever: str = "default"
    note: str = ""
    subject_weight: float = 0.0


def _rome(name: str, lever: str, note: str, **overrides: Any) -> SweepConfig:
    return SweepConfig(name, "rome", overrides, lever, note)


def _memit(name: str, lever: str, note: str, **overrides: Any) -> SweepConfig:
    return SweepConfig(name, "memit", overrides, lever, note)


#: The sweep, most informative levers first (rows exist early when it is interrupted).
CONFIGS: tuple[SweepConfig, ...] = (
    SweepConfig(UNEDITED, "none", {}, "baseline", "the unedited model on the same cases"),
    _rome("rome_default", "default", "shipped Gemma file (layer 2, KL 0.0625, clamp 4)"),
    _memit("memit_default", "default", "shipped Gemma file (layers 2-6, lambda 1500)"),
    SweepConfig(
        "rome_subjcov_0.9",
        "rome",
        {},
        "covariance",
        "C -> 0.1 C + 0.9 C_subj (subject-final keys of 2,000 other subjects)",
        subject_weight=0.9,
    ),
    _rome("rome_clamp_1", "clamp", "clamp_norm_factor 4 -> 1", clamp_norm_factor=1.0),
    _rome(
        "rome_nkl_2",
        "neighbour KL",
        "KL over 10 neighbour-like prompts (known_1000 subjects of the relation), factor 2",
        neighbour_kl_factor=2.0,
    ),
    _rome("rome_kl_x16", "KL weight", "kl_factor x16 = 1.0", kl_factor="x16"),
    _rome("rome_wd_x4", "weight decay", "weight_decay 0.5 -> 2", weight_decay="x4"),
    SweepConfig(
        "rome_subjcov_0.5",
        "rome",
        {},
        "covariance",
        "C -> 0.5 C + 0.5 C_subj (subject-final keys of 2,000 other subjects)",
        subject_weight=0.5,
    ),
    _memit(
        "memit_lambda_15000", "MEMIT lambda", "lambda 1500 -> 15000", mom2_update_weight=15000.0
    ),
    _rome("rome_kl_x4", "KL weight", "kl_factor x4 = 0.25", kl_factor="x4"),
    _rome("rome_kl_x0", "KL weight", "no KL term", kl_factor=0.0),
    _rome("rome_layer3", "layer", "layer 2 -> 3", layer=3),
    _rome("rome_layer4", "layer", "layer 2 -> 4", layer=4),
    _memit("memit_lambda_300", "MEMIT lambda", "lambda 1500 -> 300", mom2_update_weight=300.0),
    _memit("memit_layers_3_6", "MEMIT layers", "layers 2-6 -> 3-6", layers=[3, 4, 5, 6]),
    _memit("memit_layers_2_4", "MEMIT layers", "layers 2-6 -> 2-4", layers=[2, 3, 4]),
    _rome("rome_clamp_2", "clamp", "clamp_norm_factor 4 -> 2", clamp_norm_factor=2.0),
    _rome(
        "rome_kl_subject_last",
        "KL prompt",
        "KL read at the subject's last token (reference position)",
        kl_position="subject_last",
    ),
    _rome(
        "rome_kl_new_orig",
        "KL prompt",
        "KL(p_new || p_orig) (reference direction)",
        kl_direction="new_orig",
    ),
    _rome("rome_mom2_20k", "statistics", "mom2_n_tokens 100k -> 20k", mom2_n_tokens=20_000),
    _rome("rome_mom2_400k", "statistics", "mom2_n_tokens 100k -> 400k", mom2_n_tokens=400_000),
    _rome(
        "rome_original_key", "key", "original ROME key (consistent_key false)", consistent_key=False
    ),
    _rome(
        "rome_templates_21",
        "templates",
        "ROME's 21 context templates (5,10),(10,10)",
        context_templates=[[5, 10], [10, 10]],
    ),
    _rome("rome_templates_bare", "templates", "only the bare prompt", context_templates=[[5, 0]]),
    _rome("rome_layer1", "layer", "layer 2 -> 1", layer=1),
    _memit("memit_lambda_5000", "MEMIT lambda", "lambda 1500 -> 5000", mom2_update_weight=5000.0),
)

#: Subjects whose keys make ``C_subj`` (see :func:`subject_key_moment`).
N_SUBJECTS = 2000


# --------------------------------------------------------------------------- configurations


def parse_value(text: str) -> Any:
    """A value from the command line: JSON if it parses (``1.0``, ``[2, 3]``, ``false``), else
    the text itself (``subject_last``, ``x4``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_config(spec: str) -> SweepConfig:
    """``NAME:METHOD:key=value;key=value`` (the overrides may be empty) as a configuration."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise InvalidInput(f"--add expects NAME:METHOD:key=value;..., got {spec!r}")
    overrides: dict[str, Any] = {}
    for item in (parts[2] if len(parts) == 3 else "").split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--add {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = parse_value(value.strip())
    return SweepConfig(parts[0], parts[1].lower(), overrides, "extra", spec)


def _scale(text: str) -> float | None:
    if isinstance(text, str) and text[:1] in "x×":
        try:
            return float(text[1:])
        except ValueError:
            return None
    return None


def resolve_overrides(
    method: str, overrides: Mapping[str, Any], model_name: str = MODEL
) -> dict[str, Any]:
    """``overrides`` with every ``"xF"`` replaced by ``F`` times the shipped value of that field
    for ``model_name``, checked against the method's hyper-parameters (unknown names or bad
    values raise :class:`~tracing.errors.InvalidHparams` naming them)."""
    spec = get_method(method)
    shipped = spec.load_hparams(model_name)
    target_names = {f for f in TargetHparams.__dataclass_fields__}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        factor = _scale(value)
        if factor is None:
            out[key] = value
            continue
        holder = shipped.target if key in target_names and hasattr(shipped, "target") else shipped
        base = getattr(holder, key, None)
        if isinstance(base, bool) or not isinstance(base, int | float):
            raise InvalidHparams(f"{method} {key}: {value!r} scales a number, found {base!r}")
        scaled = base * factor
        if isinstance(base, int) and scaled != int(scaled):
            raise InvalidHparams(f"{method} {key}: {base} x {factor} is not a whole number")
        out[key] = int(scaled) if isinstance(base, int) else float(scaled)
    spec.load_hparams(model_name, **out)  # refuses unknown names and bad values now
    return out


def available(config: SweepConfig) -> bool:
    """Whether every field ``config`` overrides exists in this checkout's hyper-parameters
    (configurations of options added later, e.g. ``neighbour_kl_factor``, are skipped with a
    logged note where the option is missing)."""
    if config.method == "none":
        return True
    known = {f for f in get_method(config.method).hparams.__dataclass_fields__}
    known |= {f for f in TargetHparams.__dataclass_fields__} | {"layers"}
    missing = sorted(set(config.overrides) - known)
    if missing:
        log.info("skipping %s: this checkout has no %s", config.name, missing)
    return not missing


def check_configs(configs: Sequence[SweepConfig], model_name: str = MODEL) -> dict[str, dict]:
    """Every configuration's resolved overrides by name; refuses repeated names, unknown
    methods and bad overrides before any model is loaded."""
    seen: dict[str, dict] = {}
    for c in configs:
        if c.name in seen:
            raise InvalidInput(f"configuration {c.name!r} is listed twice")
        if not c.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise InvalidInput(f"configuration name {c.name!r}: letters, digits, _ - . only")
        if c.subject_weight and (c.method != "rome" or not 0 < c.subject_weight < 1):
            raise InvalidInput(f"{c.name}: subject_weight is for ROME, strictly between 0 and 1")
        if c.method == "none":
            if c.overrides:
                raise InvalidInput(f"{c.name}: the unedited model takes no overrides")
            seen[c.name] = {}
        else:
            seen[c.name] = resolve_overrides(c.method, c.overrides, model_name)
    return seen


# --------------------------------------------------------------------------- subject covariance


def subject_pool(n_subjects: int) -> list[Any]:
    """``n_subjects`` CounterFact cases of the evaluation split with distinct subjects, none of
    which is a tuning case's subject or appears in any tuning case's neighbourhood prompt
    (so ``C_subj`` never holds the keys the sweep's neighbourhood scores read)."""
    from editing.evaluation.tasks import load_cases, split_cases

    label, _, cases = load_cases("counterfact")
    tuning = split_cases(label, cases, "tuning")
    held = {c.record.subject for c in tuning}
    prompts = "\n".join(p for c in tuning for p in c.record.neighborhood_prompts)
    pool: list[Any] = []
    for c in split_cases(label, cases, "eval"):
        subject = c.record.subject
        if subject in held or subject in prompts:
            continue
        held.add(subject)
        pool.append(c)
        if len(pool) == n_subjects:
            break
    return pool


def subject_key_moment(
    model: Any, layer: int, cases: Sequence[Any]
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``C_subj = mean_s k_s k_s^T`` over the cases' MLP keys at ``layer`` read at the
    subject's last token of each case's own prompt (float64 sums, float32 result)."""
    from editing.evaluation.tasks import TASKS
    from editing.keys import subject_keys
    from editing.prepared import prepare_requests

    task = TASKS["counterfact"]
    prepared = prepare_requests(model, [task.request(c) for c in cases])
    keys = subject_keys(model, prepared, layer, templated=False).double()
    return (keys.T @ keys / len(cases)).float()


def weighted_stats(
    model: Any, hp: Any, weight: float, subject_moment: Float[torch.Tensor, "d_mlp d_mlp"]
) -> dict[int, torch.Tensor]:
    """``{layer: (1 - weight) C + weight C_subj}`` for ROME's layer, ``C`` the corpus second
    moment ``hp`` names (read from the statistics cache or computed)."""
    from editing.stats import layer_second_moments

    layer = hp.layers[0]
    c = layer_second_moments(
        model,
        [layer],
        n_tokens=hp.mom2_n_tokens,
        corpus=hp.corpus,
        dtype=hp.mom2_dtype,
        progress=False,
    )[layer].mom2
    mixed = (1 - weight) * c.double() + weight * subject_moment.to(c.device, torch.float64)
    return {layer: mixed.to(c.dtype)}


def _subject_edit_fn(model: Any, config: SweepConfig, overrides: dict, out: Path) -> Any:
    """``make_edit`` with the subject-weighted statistics of ``config`` (``C_subj`` cached in
    ``out`` per layer)."""
    from safetensors.torch import load_file, save_file

    from editing.api import make_edit, resolve_hparams

    hp = resolve_hparams(model, config.method, overrides or None)
    layer = hp.layers[0]
    path = out / f"subject_keys_layer{layer}_n{N_SUBJECTS}.safetensors"
    if path.exists():
        moment = load_file(str(path))["mom2"]
    else:
        moment = subject_key_moment(model, layer, subject_pool(N_SUBJECTS))
        save_file({"mom2": moment.contiguous()}, str(path))
    return functools.partial(
        make_edit, stats=weighted_stats(model, hp, config.subject_weight, moment)
    )


def case_relations() -> dict[int, str]:
    """CounterFact case id -> relation id, as the rebuilt neighbourhoods assigned them
    (``editing/data/counterfact_neighbourhoods.json.gz``; cases without one are absent)."""
    import gzip

    from editing.corpus import data_path

    with gzip.open(data_path("counterfact_neighbourhoods.json.gz"), "rt", encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    return {int(c["case_id"]): c["relation_id"] for c in cases if c.get("relation_id")}


def with_relations(edit_fn: Callable[..., Any], relations: Mapping[int, str]) -> Callable[..., Any]:
    """``edit_fn`` with each request's missing ``relation_id`` filled from ``relations`` (by
    case id): the reduced CounterFact records carry none, and the neighbour-KL term finds its
    other subjects by relation."""
    from dataclasses import replace

    def edit(model: Any, requests: Any, *args: Any, **kwargs: Any) -> Any:
        filled = [
            replace(r, relation_id=relations.get(r.case_id))
            if r.relation_id is None and r.case_id in relations
            else r
            for r in requests
        ]
        return edit_fn(model, filled, *args, **kwargs)

    return edit


# --------------------------------------------------------------------------- rows and table

#: (column, summary key in ``edited``) in table order; rates shown in percent.
_COLUMNS = (
    ("ES", "efficacy_success"),
    ("PS", "paraphrase_success"),
    ("NS", "neighborhood_success"),
)


def summary_row(config: SweepConfig, overrides: Mapping[str, Any], summary: Any) -> dict:
    """The sweep's row of one finished run (``summary``: its :class:`EvalSummary`), rates in
    percent. ``ns_drop`` is the unedited model's NS on the same cases minus the edited NS;
    ``nm`` the edited neighbourhood magnitude (mean ``P(true) - P(new)`` over neighbour
    prompts); ``new_gain`` the mean probability the new target gained on them."""
    ed, un = summary.edited, summary.unedited

    def pct(d: Mapping[str, Any], key: str) -> float | None:
        v = d.get(key)
        return None if v is None else 100 * float(v)

    ns, ns0 = pct(ed, "neighborhood_success"), pct(un, "neighborhood_success")
    return {
        "name": config.name,
        "method": config.method,
        "lever": config.lever,
        "note": config.note,
        "overrides": dict(overrides),
        "subject_weight": config.subject_weight,
        "n": summary.n,
        "n_failed": summary.n_failed,
        "es": pct(ed, "efficacy_success"),
        "ps": pct(ed, "paraphrase_success"),
        "ns": ns,
        "ns_unedited": ns0,
        "ns_drop": None if ns is None or ns0 is None else ns0 - ns,
        "nm": pct(ed, "neighborhood_magnitude"),
        "nm_unedited": pct(un, "neighborhood_magnitude"),
        "new_gain": pct(ed, "neighborhood_new_gain"),
        "new_gain_max": pct(ed, "neighborhood_new_gain_max"),
        "strict_es": pct(ed, "strict_efficacy"),
        "strict_ps": pct(ed, "strict_paraphrase"),
        "seconds_per_edit": summary.seconds_per_edit_median,
        "seconds_total": summary.seconds_total,
    }


def _cell(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The sweep as a Markdown table, one line per configuration (rates in percent)."""
    head = (
        "| config | lever | ES | PS | NS | NS drop | NM | new gain | strict ES | strict PS "
        "| s / edit |"
    )
    lines = [head, "|---|---|" + "---:|" * 9]
    for r in rows:
        secs = r.get("seconds_per_edit")
        cells = [_cell(r.get(k)) for k in ("es", "ps", "ns", "ns_drop", "nm", "new_gain")] + [
            _cell(r.get("strict_es")),
            _cell(r.get("strict_ps")),
            _cell(secs),
        ]
        lines.append(f"| {r['name']} | {r.get('lever', '')} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


_MARKERS = {"rome": ("o", "tab:blue"), "memit": ("s", "tab:orange")}


def plot_sweep(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """NS drop (points, lower is more local) against paraphrase success, one labelled marker
    per configuration: ROME circles, MEMIT squares; the dashed line is issue 12's goal for
    ROME (a drop of at most 3 points)."""
    fig = Figure(figsize=(8.0, 5.6), layout="constrained")
    ax = fig.subplots()
    for method, (marker, color) in _MARKERS.items():
        pts = [r for r in rows if r["method"] == method and r.get("ns_drop") is not None]
        if not pts:
            continue
        ax.scatter(
            [r["ps"] for r in pts],
            [r["ns_drop"] for r in pts],
            marker=marker,
            color=color,
            label=method.upper(),
            zorder=3,
        )
        labels: dict[tuple[float, float], list[str]] = {}  # rows on one point share a label
        for r in pts:
            at = (round(float(r["ps"]), 6), round(float(r["ns_drop"]), 6))
            labels.setdefault(at, []).append(str(r["name"]).removeprefix(f"{method}_"))
        for at, names in labels.items():
            ax.annotate(", ".join(names), at, xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.axhline(3.0, color="grey", linestyle="--", linewidth=0.8, label="goal: drop ≤ 3")
    ax.set_xlabel("paraphrase success PS (%)")
    ax.set_ylabel("neighbourhood success drop vs unedited (points)")
    sizes = sorted({int(r["n"]) for r in rows if r.get("n")})
    cases = "/".join(map(str, sizes)) or "?"
    ax.set_title(
        f"Specificity sweep, Gemma-3-270M, CounterFact tuning split: {cases} cases, "
        "up to 10 neighbours each",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


# --------------------------------------------------------------------------- running


def read_rows(path: Path) -> dict[str, dict]:
    """Finished rows by configuration name (a later line replaces an earlier one)."""
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["name"]: r for r in rows}


def _append_row(path: Path, row: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def is_done(row: Mapping[str, Any] | None, config: SweepConfig, overrides: dict, n: int) -> bool:
    """Whether ``row`` is this configuration's finished run on ``n`` requested cases."""
    return (
        row is not None
        and row.get("method") == config.method
        and row.get("overrides") == overrides
        and row.get("subject_weight", 0.0) == config.subject_weight
        and row.get("n_requested", row.get("n")) == n
    )


def run_sweep(
    configs: Sequence[SweepConfig],
    out: Path,
    n: int,
    *,
    model: Any = None,
    model_name: str = MODEL,
    evaluate_fn: Callable[..., Any] | None = None,
) -> list[dict]:
    """Run (or skip, when finished) every configuration; the rows in ``configs`` order. A
    configuration that raises is logged and left without a row (a rerun retries it).

    ``model``: the loaded model (default: load ``model_name`` when something is left to run);
    ``evaluate_fn`` replaces :func:`editing.evaluation.evaluate` (tests)."""
    from tqdm.auto import tqdm

    from editing.evaluation import EvalConfig, evaluate

    resolved = check_configs(configs, model_name)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "sweep.jsonl"
    done = read_rows(rows_path)
    todo = [c for c in configs if not is_done(done.get(c.name), c, resolved[c.name], n)]
    if todo and model is None:
        from tracing.models import load_model

        model = load_model(model_name)
    run = evaluate_fn or evaluate
    for c in tqdm(todo, desc="sweep"):
        t0 = time.perf_counter()
        log.info("configuration %s (%s %s)", c.name, c.method, resolved[c.name])
        cfg = EvalConfig(
            dataset="counterfact",
            method=c.method,
            n=n,
            batch=n,
            hparams=resolved[c.name] or None,
            out_dir=out,
            name=c.name,
            split="tuning",
            generation=None,
        )
        try:
            extra = {}
            if c.subject_weight:
                extra["edit_fn"] = _subject_edit_fn(model, c, resolved[c.name], out)
            if resolved[c.name].get("neighbour_kl_factor"):
                from editing.api import make_edit

                extra["edit_fn"] = with_relations(extra.get("edit_fn", make_edit), case_relations())
            summary = run(model, cfg, **extra)
        except Exception:  # one configuration's failure does not stop the sweep
            log.exception("configuration %s failed; its rows so far stay on disk", c.name)
            continue
        row = summary_row(c, resolved[c.name], summary)
        row.update(n_requested=n, wall_seconds=time.perf_counter() - t0)
        _append_row(rows_path, row)
        done[c.name] = row
    return [done[c.name] for c in configs if c.name in done]


def report(rows: Sequence[Mapping[str, Any]], out: Path, plot: Path | None) -> str:
    """Write ``<out>/sweep.md`` and the plot; return the table."""
    from viz.heatmap import save_figure

    table = markdown_table(rows)
    write_text_atomic(out / "sweep.md", table)
    if plot is not None and any(r.get("ns_drop") is not None for r in rows):
        save_figure(plot_sweep(rows), plot)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="known tuning cases per configuration")
    parser.add_argument("--out", default="benchmarks/results/specificity")
    parser.add_argument("--only", help="comma list of configuration names to run")
    parser.add_argument("--add", action="append", default=[], help="NAME:METHOD:key=value;...")
    parser.add_argument("--plot", default="docs/specificity_sweep.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--report", action="store_true", help="table and plot of finished rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configs = [c for c in CONFIGS if available(c)] + [parse_config(s) for s in args.add]
    if args.only:
        wanted = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"unknown configuration(s) {sorted(unknown)}")
        configs = [c for c in configs if c.name in wanted]
    resolved = check_configs(configs)
    if args.list:
        for c in configs:
            print(f"{c.name:24} {c.method:6} {json.dumps(resolved[c.name])}  # {c.note}")
        return
    out = Path(args.out)
    if args.report:
        done = read_rows(out / "sweep.jsonl")
        rows = [done[c.name] for c in configs if c.name in done]
    else:
        torch.set_num_threads(args.threads)
        rows = run_sweep(configs, out, args.n)
    print(report(rows, out, Path(args.plot) if args.plot else None), end="")


if __name__ == "__main__":
    main()
