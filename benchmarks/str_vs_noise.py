"""Benchmark: symmetric token replacement (STR) against Gaussian noise as the corruption.

Over the first N known facts the model answers correctly (top-1), each fact is traced twice
with the exact fast engine and all three kinds: ``--corruption noise`` (3 sigma, 10 samples,
the papers') and ``--corruption replace`` (a known subject of the same relation, the same
token length and another answer, drawn by the seed). Both use the normalised effect, so the
maps share a scale (0 at each corrupted run, 1 at the clean one). Traces are kept on disk
(``--out``/<known_id>/{noise,replace}.json), so an interrupted run resumes. Then, per kind:

* Spearman rank correlation of the two maps over the cells from the subject on (median and
  mean over facts);
* how often the peak layer at the last subject token, and the peak (token, layer) cell,
  agree;
* the mean normalised effect at the last subject token by layer, both corruptions side by
  side (the MLP row is what layer selection reads).

Facts for which no same-length replacement exists are skipped and counted. Prints markdown.

    nice -n 10 .venv/bin/python benchmarks/str_vs_noise.py --n 100 --out runs/str_vs_noise

``--tokens subject-last`` (a named reduction for a loaded machine) traces only the subject's
last token: the rank correlation is then over that row's layers, and the peak cell is the
peak layer there. A stored trace is reused only when its settings cover the asked ones
(kinds, samples, tokens), so runs of different settings never mix in one ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tracing.errors import InvalidInput
from tracing.facts import known_facts, load_known_facts
from tracing.models import load_model
from tracing.results import KINDS, TraceResult
from tracing.trace import trace_fact, trace_settings

if str(Path(__file__).resolve().parent) not in sys.path:  # the script next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from atp_agreement import spearman  # noqa: E402  (ranks with ties averaged, as there)

CORRUPTIONS = ("noise", "replace")


def traced(
    model, fact, folder: Path, corruption: str, samples: int, tokens: str = "all"
) -> TraceResult:
    """The fact's normalised trace under ``corruption`` (loaded from ``folder`` when a stored
    one covers these settings; else traced and stored)."""
    path = folder / f"{corruption}.json"
    options: dict[str, Any] = dict(
        kinds=KINDS, samples=samples, corruption=corruption, normalise=True, tokens=tokens
    )
    if path.is_file():
        stored = TraceResult.load(path)
        wanted, _ = trace_settings(model, **options)
        if stored.settings.covers(wanted):
            return stored
    r = trace_fact(model, fact.prompt, fact.subject, fact.answer, **options)
    folder.mkdir(parents=True, exist_ok=True)
    r.save(path)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--n", type=int, default=100, help="known facts to trace (default 100)")
    p.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    p.add_argument(
        "--tokens",
        choices=["all", "subject-last"],
        default="all",
        help="all: full maps (default); subject-last: only the subject's last token",
    )
    p.add_argument("--out", default="runs/str_vs_noise")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = load_model(args.model)
    facts = known_facts(model, load_known_facts())
    pairs: list[tuple[TraceResult, TraceResult]] = []
    skipped = 0
    for fact in tqdm(facts, desc="facts"):
        if len(pairs) >= args.n:
            break
        folder = Path(args.out) / f"{fact.known_id:05d}"
        try:
            noise = traced(model, fact, folder, "noise", args.samples, args.tokens)
            replace = traced(model, fact, folder, "replace", args.samples, args.tokens)
        except InvalidInput as exc:  # no same-length replacement, or nothing to normalise
            logging.warning("skipped %r: %s", fact.subject, exc)
            skipped += 1
            continue
        pairs.append((noise, replace))
    where = "every token" if args.tokens == "all" else "the last subject token only"
    print(f"## STR vs noise over {len(pairs)} known facts ({skipped} skipped), {where}\n")
    print("| kind | Spearman median | Spearman mean | peak layer at last subject token agrees "
          "| peak cell agrees |")  # fmt: skip
    print("|---|---|---|---|---|")
    for kind in KINDS:
        rho, layer_same, cell_same = [], 0, 0
        for a, b in pairs:
            start, last = a.subject_span[0], a.subject_span[1] - 1
            if args.tokens == "subject-last":
                a_map, b_map = a.scores[kind][last : last + 1], b.scores[kind][last : last + 1]
            else:
                a_map, b_map = a.scores[kind][start:], b.scores[kind][start:]
            rho.append(spearman(a_map.ravel(), b_map.ravel()))
            layer_same += int(np.argmax(a.scores[kind][last]) == np.argmax(b.scores[kind][last]))
            cell_same += int(a.peak(kind)[:2] == b.peak(kind)[:2])
        r = np.array(rho, dtype=float)
        print(
            f"| {kind} | {np.nanmedian(r):.3f} | {np.nanmean(r):.3f} | "
            f"{layer_same}/{len(pairs)} | {cell_same}/{len(pairs)} |"
        )
    print("\n## Mean normalised effect at the last subject token, by layer\n")
    for kind in KINDS:
        rows = {
            c: np.mean([pair[i].scores[kind][pair[i].subject_span[1] - 1] for pair in pairs], 0)
            for i, c in enumerate(CORRUPTIONS)
        }
        n = len(rows["noise"])
        print(f"**{kind}**\n")
        print("| corruption | " + " | ".join(str(i) for i in range(n)) + " |")
        print("|---|" + "---|" * n)
        for c, row in rows.items():
            print(f"| {c} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        print()


if __name__ == "__main__":
    main()
