"""Zhu et al.'s (2020) study on the embedded model: which block to fine-tune, under which
constraint, for how many modified facts (a benchmark, not a test).

For each number of facts ``K`` (``--k``, e.g. 32,128,512) the first ``K`` usable CounterFact
cases of the chosen split (default: the tuning split; no two in conflict) are modified *jointly*
by fine-tuning the tensors ``--params`` (default: whole blocks) of each block of ``--blocks``
in turn, and of every block at once (``all``), under each constraint of ``--constraints``:
``linf`` (``--epsilon``), ``fisher`` (``--fisher-weight``; the diagonal Fisher of every
block's tensors is computed once, cached, and each run uses its own tensors' entries), ``none``
(plain fine-tuning) and ``mixed`` (mixed batches, no bound). Each setting reports:

* modified facts: efficacy (P(new) > P(true) on the edit prompt), paraphrase (the same on the
  paraphrases), strict efficacy (greedy decoding gives the whole new target);
* unmodified facts: CounterFact neighbourhood (the true target still beats the new one on the
  cases' neighbourhood prompts; ``--dataset counterfact-1`` scores one per case, cheaper), and
  top-1 accuracy on known_1000 facts the unedited model answers right (all, or a seeded
  sample of ``--known``), leaving out the facts' subjects that were edited, the facts the
  Fisher reads and (when ``mixed`` is studied) the facts mixed batches train on;
* seconds of fine-tuning.

One row per setting is appended to ``<out>/rows.jsonl`` as soon as it is done, so an
interrupted study resumes where it stopped (settings already there are skipped; the settings
of a row are its key). The unedited model's numbers are one more row per ``K``. At the end a
table is printed, then the best single block per K and constraint (the most neighbourhood
accuracy kept among the blocks with efficacy >= 90 %), and a plot written
(``<out>/ft_study.png``, or ``--plot``): one column per ``K``, modified facts (ES, PS) above
and unmodified ones (NS, known-fact top-1) below, against the tuned block, one colour per
constraint. ``--report`` only redraws both from the rows.

    nice -n 10 .venv/bin/python benchmarks/ft_study.py --k 32 --blocks 0,4,8,12,17
    .venv/bin/python benchmarks/ft_study.py --k 32,128,512 --blocks all-each --whole
    .venv/bin/python benchmarks/ft_study.py --k 32,128 --report --plot docs/ft_study.png
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from editing.evaluation.results import append_rows, read_jsonl

log = logging.getLogger("ft_study")

CONSTRAINTS = ("linf", "fisher", "none", "mixed")


def _cases(task, model, dataset: str, split: str, k: int) -> list:
    """The first ``k`` usable cases of ``split`` that can be edited together: a case whose
    request conflicts with an earlier one (same prompt and subject, or same subject and
    relation with another target) is left out."""
    from editing.evaluation.tasks import load_cases, split_cases
    from editing.requests import ConflictIndex

    label, _, cases = load_cases(dataset)
    out, chosen = [], ConflictIndex()
    for case in split_cases(label, cases, split):
        req = task.request(case)
        if chosen.problem(req) is not None or task.problem(model, case) is not None:
            continue
        chosen.add(req)
        out.append(case)
        if len(out) == k:
            return out
    raise SystemExit(f"only {len(out)} usable cases in split {split!r}; {k} asked for")


def _scores(model, task, cases, facts, edited_subjects) -> dict:
    from editing.evaluation.ability import known_fact_accuracy
    from editing.evaluation.metrics import ModelScorer, aggregate

    post = task.score(ModelScorer(model), cases)
    rows = [task.metrics(p, None) for p in post]
    agg = aggregate(rows)
    acc, n = known_fact_accuracy(model, facts, exclude_subjects=edited_subjects)
    return {
        "efficacy": agg.get("efficacy_success"),
        "paraphrase": agg.get("paraphrase_success"),
        "strict_efficacy": agg.get("strict_efficacy"),
        "neighborhood": agg.get("neighborhood_success"),
        "known_top1": acc,
        "known_n": n,
    }


def _hparams(args: argparse.Namespace, layers: list[int], constraint: str):
    from editing.methods.finetune import FTHparams

    mode = {"none": "unconstrained", "mixed": "mixed"}.get(constraint, "constrained")
    return FTHparams(
        layers=layers,
        params=args.params,
        mode=mode,
        constraint="fisher" if constraint == "fisher" else "linf",
        norm_constraint=args.epsilon if constraint == "linf" else None,
        fisher_weight=args.fisher_weight,
        lr=args.lr,
        num_steps=args.steps,
        batch_size=args.batch_size,
        fisher_sequences=args.fisher_sequences,
        fisher_facts=args.fisher_facts,
    )


def _key(row: dict) -> tuple:
    return (row["k"], str(row["blocks"]), row["constraint"])


def _table(rows: Sequence[dict]) -> str:
    """The rows as the Markdown table ``docs/RESULTS.md`` shows (percentages, one decimal):
    by K, then the unedited row, the blocks in order and every block at once, l-inf first."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    def order(r: dict) -> tuple:
        b = str(r["blocks"])
        where = -1 if b == "-" else 10**6 if b == "all" else int(b)
        how = ("unedited", *CONSTRAINTS)
        return (r["k"], where, how.index(r["constraint"]) if r["constraint"] in how else 99)

    lines = [
        "| K | blocks | constraint | ES | PS | strict ES | NS | known top-1 | s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=order):
        scores = ("efficacy", "paraphrase", "strict_efficacy", "neighborhood", "known_top1")
        cells = [r["k"], r["blocks"], r["constraint"], *(pct(r[s]) for s in scores)]
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _best(rows: Sequence[dict], min_efficacy: float = 0.9) -> str:
    """Which single block to tune, per K and constraint: the one that keeps the most
    unmodified facts (CounterFact neighbourhood) among the blocks whose efficacy is at least
    ``min_efficacy`` (a Markdown table; "none" where no block writes the facts that well)."""
    lines = [
        f"| K | constraint | best block (NS among ES >= {100 * min_efficacy:.0f}) | ES | NS |",
        "|---:|---|---|---:|---:|",
    ]
    pairs = {(r["k"], r["constraint"]) for r in rows if r["constraint"] in CONSTRAINTS}
    settings = sorted(pairs, key=lambda kc: (kc[0], CONSTRAINTS.index(kc[1])))
    for k, constraint in settings:
        ok = [
            r
            for r in rows
            if (r["k"], r["constraint"]) == (k, constraint)
            and r["blocks"] not in ("-", "all")
            and (r["efficacy"] or 0.0) >= min_efficacy
        ]
        if not ok:
            lines.append(f"| {k} | {constraint} | none | - | - |")
            continue
        r = max(ok, key=lambda r: r["neighborhood"] or 0.0)
        es, ns = 100 * r["efficacy"], 100 * (r["neighborhood"] or 0.0)
        lines.append(f"| {k} | {constraint} | {r['blocks']} | {es:.1f} | {ns:.1f} |")
    return "\n".join(lines)


def _plot(rows: Sequence[dict], path: Path) -> None:
    """One column per K: modified facts on top (ES solid, PS dashed), unmodified facts
    below (NS solid, known-fact top-1 dashed), against the tuned block; one colour per
    constraint, the unedited model's values in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(2, len(ks), figsize=(4.2 * len(ks) + 0.6, 6.4), squeeze=False)
    colours = dict(zip(CONSTRAINTS, ("C0", "C1", "C2", "C3"), strict=True))
    panels = (
        ("modified facts", (("efficacy", "-o", "ES"), ("paraphrase", "--s", "PS"))),
        ("unmodified facts", (("neighborhood", "-o", "NS"), ("known_top1", "--^", "known"))),
    )
    for col, k in enumerate(ks):
        here = [r for r in rows if r["k"] == k and r["constraint"] != "unedited"]
        blocks = sorted({r["blocks"] for r in here if r["blocks"] != "all"}, key=int)
        has_all = any(r["blocks"] == "all" for r in here)
        xs = {b: i for i, b in enumerate([*blocks, *(["all"] if has_all else [])])}
        base = next((r for r in rows if r["k"] == k and r["constraint"] == "unedited"), None)
        for row, (title, series) in enumerate(panels):
            ax = axes[row][col]
            for c in CONSTRAINTS:
                mine = sorted(
                    (r for r in here if r["constraint"] == c), key=lambda r: xs[r["blocks"]]
                )
                if not mine:
                    continue
                x = [xs[r["blocks"]] for r in mine]
                for key, style, label in series:
                    ax.plot(
                        x, [r[key] for r in mine], style, color=colours[c], label=f"{c}: {label}"
                    )
            if base is not None:
                for key, style, _ in series:
                    ax.axhline(base[key], color="grey", lw=0.8, ls=style[:-1])
            ax.set_xticks(list(xs.values()), [str(b) for b in xs])
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"K = {k}: {title}", fontsize=10)
            if row == 1:
                ax.set_xlabel("fine-tuned block")
            if col == 0:
                ax.set_ylabel("accuracy")
            ax.legend(fontsize=7, loc="best")
    fig.text(0.5, 0.005, "grey: the unedited model", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--k", default="32", help="numbers of modified facts, e.g. 32,128,512")
    p.add_argument(
        "--blocks", default="0,4,8,12,17", help="blocks tuned one at a time, or all-each"
    )
    p.add_argument("--whole", action="store_true", help="also tune every block at once")
    p.add_argument("--params", default="block", help="down_proj, mlp, attn or block")
    p.add_argument("--constraints", default="linf,fisher", help=f"some of {CONSTRAINTS}")
    p.add_argument("--epsilon", type=float, default=1e-3)
    p.add_argument("--fisher-weight", type=float, default=1e3)
    p.add_argument("--fisher-sequences", type=int, default=32)
    p.add_argument("--fisher-facts", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="tuning", help="CounterFact split: tuning or eval")
    p.add_argument(
        "--dataset",
        default="counterfact",
        help="counterfact (ten neighbourhood prompts per case) or counterfact-1 (one: cheaper)",
    )
    p.add_argument(
        "--known", type=int, default=0, help="known facts scored (a seeded sample; 0: all)"
    )
    p.add_argument("--out", default="results/ft_study")
    p.add_argument("--plot", default=None, help="plot file (default <out>/ft_study.png)")
    p.add_argument(
        "--report",
        action="store_true",
        help="only print the table and draw the plot of the rows in --out (no model)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ks = [int(k) for k in args.k.split(",")]
    out = Path(args.out)
    rows_path = out / "rows.jsonl"
    plot = Path(args.plot) if args.plot else out / "ft_study.png"
    if args.report:
        _report(rows_path, ks, plot)
        return

    from editing.evaluation.tasks import TASKS
    from editing.methods.finetune import default_neutral_facts, finetune_edit
    from editing.params import block_parameters
    from editing.requests.prepared import prepare_requests
    from editing.statistics.fisher import (
        FACTS_SEED,
        FisherSettings,
        answered_facts,
        fisher_diagonal,
    )
    from tracing.facts import known_facts, load_known_facts
    from tracing.layers import parse_layers
    from tracing.models import load_model, n_layers

    constraints = [c for c in args.constraints.split(",") if c]
    unknown = sorted(set(constraints) - set(CONSTRAINTS))
    if unknown:
        raise SystemExit(f"unknown constraints {unknown}; expected some of {CONSTRAINTS}")
    out.mkdir(parents=True, exist_ok=True)
    chooses = ("k", "blocks", "whole", "constraints", "out", "plot", "report")  # not how
    settings = {k: v for k, v in vars(args).items() if k not in chooses}
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise SystemExit(f"{out} holds a study with other settings: choose another --out")
    settings_path.write_text(json.dumps(settings, indent=1))

    model = load_model(args.model)
    n = n_layers(model)
    blocks = list(range(n)) if args.blocks == "all-each" else parse_layers(args.blocks)
    targets: list[list[int]] = [[b] for b in blocks] + ([list(range(n))] if args.whole else [])
    task = TASKS["counterfact"]
    done = {_key(r) for r in read_jsonl(rows_path)}

    fisher = None
    if "fisher" in constraints:
        everything = {}
        for layer in sorted({b for t in targets for b in t}):
            everything.update(block_parameters(model, layer, args.params))
        fs = FisherSettings(n_sequences=args.fisher_sequences, n_facts=args.fisher_facts)
        fisher = fisher_diagonal(model, everything, fs)

    known = [f for f in known_facts(model, load_known_facts()) if f.answer]
    if args.known:
        known = random.Random(0).sample(known, min(args.known, len(known)))
    for k in ks:
        cases = _cases(task, model, args.dataset, args.split, k)
        requests = [task.request(c) for c in cases]
        subjects = [r.subject for r in requests]
        held = {p for p, _ in answered_facts(model, args.fisher_facts, seed=FACTS_SEED)}
        if "mixed" in constraints:  # at K = 512 these would be every known fact
            neutral = default_neutral_facts(model, max(16, k), exclude_subjects=subjects)
            held |= {p for p, _ in neutral}
        facts = [f for f in known if f.prompt not in held]
        base = {"k": k, "blocks": "-", "constraint": "unedited"}
        if _key(base) not in done:
            unedited = {**base, **_scores(model, task, cases, facts, []), "seconds": 0.0}
            append_rows(rows_path, [unedited])
        prepared = prepare_requests(model, requests)
        todo = [(t, c) for t in targets for c in constraints]
        for layers, constraint in tqdm(todo, desc=f"K={k}"):
            name = "all" if len(layers) == n and len(layers) > 1 else str(layers[0])
            row = {"k": k, "blocks": name, "constraint": constraint}
            if _key(row) in done:
                continue
            hp = _hparams(args, layers, constraint)
            t0 = time.perf_counter()
            edit = finetune_edit(model, prepared, hp, fisher=fisher, progress=False)
            seconds = time.perf_counter() - t0
            with edit.applied(model):
                scores = _scores(model, task, cases, facts, subjects)
            row.update(scores, seconds=seconds, final_loss=edit.metadata["losses"][-1])
            append_rows(rows_path, [row])
            log.info("%s", row)
    _report(rows_path, ks, plot)


def _report(rows_path: Path, ks: Sequence[int], plot: Path) -> None:
    """Print the table of the rows of ``rows_path`` for the numbers of facts ``ks`` and draw
    their plot."""
    rows = [r for r in read_jsonl(rows_path) if r["k"] in ks]
    if not rows:
        raise SystemExit(f"no rows for these K in {rows_path}")
    print(_table(rows))
    print(_best(rows))
    _plot(rows, plot)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
