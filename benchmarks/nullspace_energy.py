"""How null is AlphaEdit's null space for the keys that facts use? (a study, not a test)

AlphaEdit projects each update onto the eigen-directions of the preserved keys' second moment
``C = E[k kᵀ]`` whose eigenvalues fall below a threshold, so that ``k Δ ≈ 0`` for keys like
those ``C`` was estimated on. How much of a key population's energy lies in that subspace,
``Σ ||P k||² / Σ ||k||²``, is what an update there can still disturb. This prints, per edited
layer and threshold, that share for

* the statistics' own keys (WikiText, ``trace(P C) / trace(C)``),
* the MLP keys at the subject's last token of known_1000 facts (what known-fact accuracy and
  the neighbourhood prompts read),
* the keys at the other positions of the same prompts (BOS left out),

and the facts' subject-key energy relative to the mean WikiText key's. A second table says
how close the known facts are to flipping: the share of the known_1000 facts the model answers
(top-1, the facts of the sequential runner's known-fact accuracy) whose top-1 log-probability
leads the runner-up's by less than a gap, i.e. how small a change of the logits turns a point
of that accuracy. With ``--control R2,R3,...`` a third table: known-fact accuracy and held-out
perplexity after a random update of each edited layer's down-projection, drawn in the null
space (``Δ = P G``, ``G`` Gaussian, seeded) and scaled to ``R_l`` times the weight's norm, i.e.
what an update of an AlphaEdit batch's size does when it carries no edit at all; the weights
are restored bit for bit afterwards.

    .venv/bin/python benchmarks/nullspace_energy.py                  # the Gemma AlphaEdit file
    .venv/bin/python benchmarks/nullspace_energy.py --facts 100 --thresholds 0.02,0.005
    .venv/bin/python benchmarks/nullspace_energy.py --facts 20 --control 0.18,0.18,0.09,0.07,0.08
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--facts", type=int, default=400, help="known_1000 facts read (first N)")
    ap.add_argument("--thresholds", default="0.02,0.005,0.002")
    ap.add_argument(
        "--control",
        help="per edited layer, ||update|| / ||W|| of a random null-space update (threshold: "
        "the first of --thresholds)",
    )
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    ratios = [float(r) for r in args.control.split(",")] if args.control else []
    if args.facts < 1 or not all(t > 0 for t in thresholds):
        ap.error("--facts must be >= 1 and every threshold > 0")

    from editing.edits.weights import add_to_weight, restoring_weights, weights_checksums
    from editing.evaluation.ability import heldout_sequences, known_fact_accuracy, perplexity
    from editing.hparams import KeyValueHparams
    from editing.methods import load_hparams
    from editing.statistics.keys import layer_stats
    from editing.statistics.nullspace import null_space_projector
    from tracing.errors import InvalidInput
    from tracing.facts import known_facts, load_known_facts, tokenize_fact
    from tracing.forward import capture_states, last_token_logits
    from tracing.models import down_proj, hook_name, load_model

    model = load_model(args.model)
    hp = load_hparams("alphaedit", args.model)
    assert isinstance(hp, KeyValueHparams)
    layers = sorted(int(L) for L in hp.layers or [])
    if not layers:
        ap.error(f"the AlphaEdit file of {args.model} names no layers")
    if ratios and (len(ratios) != len(layers) or not all(r >= 0 for r in ratios)):
        ap.error(f"--control needs {len(layers)} ratios >= 0, one per layer {layers}")
    moms = layer_stats(model, layers, hp, progress=True)
    names = [hook_name(model, "mlp_key", L) for L in layers]
    subject: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    other: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    used = 0
    for fact in load_known_facts()[: args.facts]:
        try:
            tf = tokenize_fact(model, fact.prompt, fact.subject)
        except InvalidInput:
            continue
        used += 1
        got = capture_states(model, torch.tensor([tf.ids]), names, names[-1])
        rest = torch.ones(len(tf.ids), dtype=torch.bool)
        rest[[0, tf.subject_last]] = False
        for L, name in zip(layers, names, strict=True):
            keys = got[name][0].double()
            subject[L].append(keys[tf.subject_last])
            other[L].append(keys[rest])

    def share(P: torch.Tensor, K: torch.Tensor) -> float:
        return float((K @ P).pow(2).sum() / K.pow(2).sum())

    print(f"# key energy in AlphaEdit's null space, {args.model}, {used} known_1000 facts")
    print(
        "| layer | threshold | null dims | WikiText keys | fact subject-last keys "
        "| other fact-prompt keys | subject ‖k‖² / WikiText mean |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for L in layers:
        C = moms[L].double()
        S, R = torch.stack(subject[L]), torch.cat(other[L])
        relative = float(S.pow(2).sum(1).mean() / torch.trace(C))
        for t in thresholds:
            P = null_space_projector(C, t)
            wiki = float(torch.trace(P @ C) / torch.trace(C))
            print(
                f"| {L} | {t:g} | {round(float(P.trace()))} | {wiki:.3f} | {share(P, S):.3f} "
                f"| {share(P, R):.3f} | {relative:.2f} |"
            )

    known = [f for f in known_facts(model, load_known_facts()) if f.answer]
    gaps, firsts = [], []
    for i in range(0, len(known), 128):
        logp = torch.log_softmax(
            last_token_logits(model, [f.prompt for f in known[i : i + 128]]).float(), dim=-1
        )
        top = logp.topk(2, dim=-1).values
        gaps.append(top[:, 0] - top[:, 1])
        firsts.append(top[:, 0].exp())
    gap, first = torch.cat(gaps), torch.cat(firsts)
    print(f"\n# how close the {len(known)} known facts are to flipping (top-1 minus runner-up)")
    print("| log-prob gap below | 0.1 | 0.25 | 0.5 | 1 | 2 | median gap | median top-1 p |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    shares = " | ".join(
        f"{float((gap < q).float().mean()) * 100:.1f} %" for q in (0.1, 0.25, 0.5, 1, 2)
    )
    print(
        f"| share of facts | {shares} | {float(gap.median()):.2f} | {float(first.median()):.2f} |"
    )

    if not ratios:
        return
    seqs = heldout_sequences(model)
    before = weights_checksums(model)
    base = (known_fact_accuracy(model, known)[0], perplexity(model, seqs))
    gen = torch.Generator().manual_seed(0)
    with restoring_weights(model, layers, always=True):
        for L, r in zip(layers, ratios, strict=True):
            W = down_proj(model, L)
            P = null_space_projector(moms[L].double(), thresholds[0])
            update = P @ torch.randn(W.shape, generator=gen, dtype=torch.float64)
            add_to_weight(W, update * (r * float(W.double().norm()) / float(update.norm())))
        after = (known_fact_accuracy(model, known)[0], perplexity(model, seqs))
    assert weights_checksums(model) == before, "weights not restored"
    print(f"\n# a random null-space update (threshold {thresholds[0]:g}) of the given sizes")
    print("| ‖Δ‖ / ‖W‖ per layer | known-fact acc | perplexity |")
    print("|---|---:|---:|")
    print(f"| none | {base[0] * 100:.1f} | {base[1]:.2f} |")
    print(f"| {', '.join(f'{r:g}' for r in ratios)} | {after[0] * 100:.1f} | {after[1]:.2f} |")


if __name__ == "__main__":
    main()
