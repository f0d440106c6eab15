"""One UltraEdit batch on the embedded model: time per batch and what it writes, per setting.

For each setting (layers, lr), the first ``--n`` tuning-split CounterFact cases the unedited
model knows (P(true) > P(new) on the edit prompt) are edited in one batch; the script
prints and appends to ``--out`` (JSONL, one row per setting, so a stopped run resumes
where it left off): seconds for the edit, ES / PS (P(new) > P(true) on the edit prompt /
paraphrases), NS (P(true) > P(new) on the neighbourhood prompts; unedited alongside) and
held-out WikiText perplexity (``--ppl-tokens``) before and after. The weights are restored
after each setting.

    nice python benchmarks/ultraedit_batch.py --n 100 --out results/ultra_batch.jsonl \
        --settings 11-16:1e-6 2-6:1e-6
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from editing.api import make_edit
from editing.evaluation.ability import heldout_sequences, perplexity
from editing.evaluation.scoring import ModelScorer
from editing.evaluation.tasks import load_cases, split_cases
from editing.requests import EditRequest
from tracing.models import load_model

log = logging.getLogger(__name__)


def _layers(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def _rates(scorer, cases, want_new: bool) -> tuple[float, float, float]:
    """ES, PS, NS in percent over ``cases`` (NS: true beats new on neighbours)."""
    out = []
    for kind in ("edit", "para", "neigh"):
        pairs, owners = [], []
        for i, r in enumerate(cases):
            prompts = {
                "edit": [r.template.format(r.subject)],
                "para": list(r.paraphrase_prompts),
                "neigh": list(r.neighborhood_prompts),
            }[kind]
            for p in prompts:
                pairs += [(p, r.target_new), (p, r.target_true)]
                owners.append(i)
        s = scorer.score(pairs)
        wins = [s[2 * j].mean_logprob > s[2 * j + 1].mean_logprob for j in range(len(owners))]
        if kind == "neigh":
            wins = [not w for w in wins]
        out.append(100.0 * sum(wins) / max(1, len(wins)))
    return out[0], out[1], out[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--settings", nargs="+", default=["11-16:1e-6"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    done = set()
    if args.out.exists():
        done = {r["setting"] for r in map(json.loads, args.out.read_text().splitlines())}
    model = load_model("gemma-3-270m")
    scorer = ModelScorer(model)
    label, task, cases = load_cases("counterfact")
    records = [c.record for c in split_cases(label, cases, "tuning")]
    picked: list = []
    for r in records:
        if len(picked) >= args.n:
            break
        s = scorer.score([(r.template.format(r.subject), t) for t in (r.target_true, r.target_new)])
        if s[0].mean_logprob > s[1].mean_logprob:
            picked.append(r)
    held = heldout_sequences(model, args.ppl_tokens)
    base = {"ppl": perplexity(model, held), "rates": _rates(scorer, picked, True)}
    reqs = [
        EditRequest(r.template, r.subject, r.target_new, r.target_true, r.case_id) for r in picked
    ]
    for setting in args.settings:
        if setting in done:
            continue
        layers, _, lr = setting.partition(":")
        hp = {"layers": _layers(layers), "lr": float(lr)}
        t0 = time.perf_counter()
        edit = make_edit(model, reqs, "ultraedit", hp, progress=False)
        seconds = time.perf_counter() - t0
        with edit.applied(model):
            es, ps, ns = _rates(scorer, picked, True)
            ppl = perplexity(model, held)
        row = {
            "setting": setting,
            "n": len(picked),
            "seconds_edit": round(seconds, 1),
            "ES": es,
            "PS": ps,
            "NS": ns,
            "unedited_ES_PS_NS": base["rates"],
            "perplexity": ppl,
            "perplexity_unedited": base["ppl"],
        }
        log.info("%s", row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
