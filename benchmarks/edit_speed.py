"""Speed and memory of editing on the embedded model (a benchmark, not a test).

Prints four tables:

1. second-moment statistics: tokens/s collecting every layer in ONE pass vs one pass per layer
   (fresh temporary caches, so nothing is read from disk);
2. ROME: seconds per edit, wall and CPU (statistics already cached; their one-off cost is
   printed apart);
3. MEMIT scaling: batches of 10, 100 and 1,000 known evaluation-split CounterFact cases
   (``--sizes``; 10000 when there is time), each edited at once through the evaluation runner
   in its own child process, so its peak resident memory (``resource.getrusage``, edit and
   scoring) is its own: seconds per request, z optimisation vs layer updates, peak memory,
   ES/PS/NS of the batch. Resumable across runs: a size measured before is read back from
   ``--out``, and an interrupted batch keeps every finished request's z there;
4. the vocabulary projection (``--vocab``, off by default): seconds for N final states
   projected onto the 262,144-word vocabulary in one product (the bridge's unembedding) vs a
   slice of the vocabulary at a time (:mod:`tracing.vocab`, what ``final_logits`` does on
   the CPU), forward and forward + backward; then the v*/z objective's per-read losses with
   their gradient, the generic path against one sweep over the unembedding
   (:mod:`editing.targets.vocab_loss`);
5. the z optimisation alone (``--z N``, off by default): MEMIT's Gemma file, the first N
   known CounterFact cases as one group at MEMIT's last layer, with ``--z-budget`` positions
   per pass (default: the library's): seconds, mean steps, mean final NLL, peak RSS of the
   process.

    .venv/bin/python benchmarks/edit_speed.py                 # the first three tables
    .venv/bin/python benchmarks/edit_speed.py --skip-stats --skip-rome --skip-scaling --vocab
    .venv/bin/python benchmarks/edit_speed.py --skip-stats --skip-rome --sizes 10,100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def counterfact_requests(model, n: int) -> list:
    """The first ``n`` CounterFact cases that pass validation together (no duplicates or
    conflicts)."""
    from editing.evaluation.tasks import load_cases
    from editing.requests import validate_requests

    out, seen = [], set()
    _, task, cases = load_cases("counterfact")
    for case in cases:
        req = task.request(case)
        if (req.subject, req.template) in seen:
            continue
        try:
            validate_requests(model, [req])
        except ValueError:
            continue
        seen.add((req.subject, req.template))
        out.append(req)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} usable CounterFact requests")


def bench_stats(model, layers: list[int], n_tokens: int) -> None:
    from editing.statistics.stats import layer_second_moments

    print(f"\n## Statistics E[kk^T]: {n_tokens} tokens, layers {layers[0]}-{layers[-1]}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        layer_second_moments(
            model, layers, n_tokens=n_tokens, cache_dir=Path(tmp) / "one", progress=False
        )
        one = time.perf_counter() - t
        t = time.perf_counter()
        for L in layers:
            layer_second_moments(
                model, [L], n_tokens=n_tokens, cache_dir=Path(tmp) / f"L{L}", progress=False
            )
        per = time.perf_counter() - t
    print("| how | seconds | tokens/s (all layers) | layer-tokens/s |")
    print("|---|---|---|---|")
    for name, s in (("all layers, one pass", one), ("one pass per layer", per)):
        print(f"| {name} | {s:.1f} | {n_tokens / s:,.0f} | {n_tokens * len(layers) / s:,.0f} |")
    print(f"one pass is {per / one:.1f}x faster")


def bench_rome(model, n_edits: int) -> None:
    from editing.api import make_edit
    from editing.methods import load_hparams
    from editing.methods.rome import RomeHparams
    from editing.requests.context import context_templates
    from editing.statistics.keys import layer_stats

    hp = load_hparams("rome", "gemma-3-270m")
    assert isinstance(hp, RomeHparams) and hp.layer is not None
    t = time.perf_counter()
    stats = layer_stats(model, [hp.layer], hp)
    templates = context_templates(model, hp.context_templates)
    setup = time.perf_counter() - t
    print(f"\n## ROME (layer {hp.layer}, {len(templates)} templates, {hp.target.num_steps} steps)")
    print(f"statistics + templates (cached after the first run): {setup:.1f} s")
    print("| request | seconds | CPU seconds | steps | target NLL before -> after |")
    print("|---|---|---|---|---|")
    times, cpu = [], []
    for req in counterfact_requests(model, n_edits):
        t, c = time.perf_counter(), time.process_time()
        edit = make_edit(model, [req], "rome", hp, stats=stats, progress=False)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        md = edit.metadata
        print(
            f"| {req.subject} -> {req.target_new.strip()} | {times[-1]:.1f} | {cpu[-1]:.1f} "
            f"| {md['steps'] + 1} | {md['nll_before']:.2f} -> {md['nll_after']:.3f} |",
            flush=True,
        )
    # CPU seconds (all threads) tell whether a slow wall time is the CPUs being shared
    print(
        f"mean {sum(times) / len(times):.1f} s per ROME edit "
        f"({sum(cpu) / len(cpu):.1f} CPU s; {n_edits} edits)"
    )


def bench_vocab(model, sizes: tuple[int, ...] = (12, 100, 300, 1000), repeats: int = 3) -> None:
    from tracing.vocab import VOCAB_SLICE, project

    def timed(x: torch.Tensor, sliced: bool, backward: bool) -> float:
        run(x, sliced, backward)  # warm
        t = time.perf_counter()
        for _ in range(repeats):
            run(x, sliced, backward)
        return (time.perf_counter() - t) / repeats

    def run(x: torch.Tensor, sliced: bool, backward: bool) -> None:
        x = x.detach().requires_grad_(backward)
        out = project(model, x) if sliced else model.unembed(x)
        if backward:
            out.sum().backward()

    print(f"\n## Vocabulary projection ({VOCAB_SLICE} rows per slice, {repeats} repeats)")
    print("| states | one product s | sliced s | one product fwd+bwd s | sliced fwd+bwd s |")
    print("|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        x = torch.randn(n, model.cfg.d_model, generator=g)
        with torch.no_grad():
            one, mine = timed(x, False, False), timed(x, True, False)
        one_b, mine_b = timed(x, False, True), timed(x, True, True)
        print(f"| {n} | {one:.3f} | {mine:.3f} | {one_b:.3f} | {mine_b:.3f} |", flush=True)
    bench_read_losses(model, sizes, repeats)


def bench_read_losses(model, sizes: tuple[int, ...], repeats: int) -> None:
    """The objective's per-read losses and their gradient (editing.targets.vocab_loss): the generic
    path (projection, log-softmax over [reads, vocab], backward product) against the one
    sweep over the unembedding; one read in twelve a KL read, as in a ROME step."""
    from editing.targets.vocab_loss import DistRefs, read_losses
    from tracing.models import final_logprobs

    def run(x, target, refs, fused: bool) -> torch.Tensor:
        x = x.detach().requires_grad_()
        loss = read_losses(model, x, target, refs, "orig_new", fused=fused)
        loss.sum().backward()
        return loss.detach()

    print("\n## Read losses with their gradient (KL(orig || new) at one read in twelve)")
    print("| reads | generic fwd+bwd s | one sweep fwd+bwd s | max abs loss difference |")
    print("|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    vocab = int(model.cfg.d_vocab)
    for n in sizes:
        x = torch.randn(n, model.cfg.d_model, generator=g) * 5
        target = torch.randint(0, vocab, (n,), generator=g)
        target[::12] = -1
        with torch.no_grad():
            near = x[target < 0] + torch.randn(int((target < 0).sum()), x.shape[1], generator=g)
            logq = final_logprobs(model, near[None])[0]
        refs = DistRefs.from_logq(model, logq)
        secs, losses = [], []
        for fused in (False, True):
            run(x, target, refs, fused)  # warm
            t = time.perf_counter()
            for _ in range(repeats):
                losses.append(run(x, target, refs, fused))
            secs.append((time.perf_counter() - t) / repeats)
        diff = float((losses[0] - losses[-1]).abs().max())
        print(f"| {n} | {secs[0]:.3f} | {secs[1]:.3f} | {diff:.1e} |", flush=True)


def bench_z(model, n: int, budget: int | None) -> None:
    from editing.methods import load_hparams
    from editing.methods.memit import MemitHparams
    from editing.requests.context import context_template_groups
    from editing.requests.prepared import prepare_requests
    from editing.targets.objective import compute_targets

    hp = load_hparams("memit", "gemma-3-270m")
    assert isinstance(hp, MemitHparams) and hp.layers
    reqs = counterfact_requests(model, n)
    prep = prepare_requests(model, reqs, context_template_groups(model, hp.context_templates))
    t = time.perf_counter()
    res = compute_targets(
        model, prep, layer=hp.layers[-1], hook="resid", hp=hp.target, max_batch_tokens=budget
    )
    seconds = time.perf_counter() - t
    print(f"\n## z optimisation (MEMIT, layer {hp.layers[-1]}, {n} requests, budget {budget})")
    print("| requests | seconds | s / request | mean steps | mean final NLL | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {n} | {seconds:.1f} | {seconds / n:.2f} | {sum(res.steps) / n:.1f} "
        f"| {sum(res.nll_after) / n:.4f} | {_peak_mib():,.0f} |"
    )


def memit_child(n: int, method: str, out: Path) -> dict:
    """One batch of the first ``n`` known evaluation-split CounterFact cases, edited at once
    with ``method`` through the evaluation runner (its run folder and per-request z cache
    under ``out``, so an interrupted batch resumes); returns the measurements."""
    from editing.evaluation import evaluate
    from editing.evaluation.results import read_rows
    from editing.hparams import KeyValueHparams
    from editing.methods import load_hparams
    from editing.statistics.keys import layer_stats
    from tracing.models import load_model

    model = load_model("gemma-3-270m")
    hp = load_hparams(method, "gemma-3-270m")
    assert isinstance(hp, KeyValueHparams)
    layer_stats(model, hp.layers or [], hp)  # cached: not part of the edit's time
    base = _rss_mib()
    name = f"{method}_{n}"
    summary = evaluate(
        model,
        method=method,
        n=n,
        batch=n,
        out_dir=out,
        name=name,
        generation=None,
        progress=True,
    )
    rows = list(read_rows(out / name / "cases.jsonl").values())
    first = rows[0]
    return {
        "method": method,
        "n": summary.n,
        "seconds": first["edit_seconds"] * first["unit_size"],
        "seconds_targets": first.get("seconds_targets"),
        "seconds_layers": first.get("seconds_layers"),
        "rss_before_mib": base,
        "peak_mib": _peak_mib(),
        "edited": summary.edited,
        "unedited": summary.unedited,
        "layers": hp.layers,
    }


def bench_scaling(sizes: list[int], method: str, threads: int, out: Path) -> None:
    """The scaling table: one batch per size, each in a fresh process (its own peak
    memory); a size measured before is read from ``out`` (resumable across runs)."""
    print(f"\n## {method.upper()} scaling (one batch per size, each in a fresh process)")
    print(
        "| requests | s / request | z optimisation s | layer updates s | RSS before MiB "
        "| peak RSS MiB | ES | PS | NS (unedited) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        record = out / f"{method}_{n}.json"
        if not record.is_file():
            cmd = [sys.executable, __file__, "--child", str(n), "--method", method]
            cmd += ["--threads", str(threads), "--out", str(out)]
            got = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            record.write_text(got.strip().splitlines()[-1] + "\n")
        r = json.loads(record.read_text())
        e, u = r["edited"], r["unedited"]
        print(
            f"| {r['n']} | {r['seconds'] / r['n']:.2f} | {r['seconds_targets']:.0f} | "
            f"{r['seconds_layers']:.0f} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{100 * e['efficacy_success']:.1f} | {100 * e['paraphrase_success']:.1f} | "
            f"{100 * e['neighborhood_success']:.1f} ({100 * u['neighborhood_success']:.1f}) |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--stats-tokens", type=int, default=8192, help="tokens for table 1")
    ap.add_argument("--stats-layers", default="0-17", help="layers for table 1 (e.g. 2-6)")
    ap.add_argument("--rome-edits", type=int, default=3, help="ROME edits to time")
    ap.add_argument("--sizes", default="10,100,1000", help="batch sizes of the scaling table")
    ap.add_argument("--method", default="memit", help="batched method (memit, alphaedit)")
    ap.add_argument(
        "--out", default="benchmarks/results/scaling", help="run folders and measured sizes"
    )
    ap.add_argument("--skip-stats", action="store_true")
    ap.add_argument("--skip-rome", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--vocab", action="store_true", help="also time the vocabulary projection")
    ap.add_argument("--z", type=int, help="also time the z optimisation of N requests")
    ap.add_argument("--z-budget", type=int, help="positions per pass for --z")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.child:
        print(json.dumps(memit_child(args.child, args.method, out)))
        return
    from tracing.layers import parse_layers
    from tracing.models import load_model

    model = load_model("gemma-3-270m")
    print(f"# factscope editing speed, gemma-3-270m, {args.threads} thread(s)")
    if not args.skip_stats:
        bench_stats(model, parse_layers(args.stats_layers), args.stats_tokens)
    if not args.skip_rome:
        bench_rome(model, args.rome_edits)
    if args.vocab:
        bench_vocab(model)
    if args.z:
        bench_z(model, args.z, args.z_budget)
    if not args.skip_scaling:
        out.mkdir(parents=True, exist_ok=True)
        sizes = [int(x) for x in args.sizes.split(",") if x]
        bench_scaling(sizes, args.method, args.threads, out)


if __name__ == "__main__":
    main()
