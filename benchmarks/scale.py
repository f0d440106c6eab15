"""Time and peak memory of every step a user runs, on random models of the real widths, on
the CPU (a benchmark, not a test): GPT-2 XL whole, and GPT-J-6B, Llama-3-8B and Qwen2.5-7B
with their real width, heads, MLP width and vocabulary but only the few blocks that fit.

The models are :mod:`gpu_models`' (``benchmarks/gpu_models.py``): the architecture's random
initialisation with the real config, float32, built on the CPU, a small byte-level BPE
tokenizer trained on the spot; nothing is downloaded. Each (model, step) cell runs in a fresh
subprocess (:func:`scale_steps.run_cell`) that builds the model, prepares what the step takes
as given (statistics, requests, context templates; untimed), resets its peak resident set and
measures the step: seconds, peak resident set (``VmHWM``), the resident size before the step
(weights + statistics in hand + the runtime) and ``transient = peak - that``. The parent
watches each worker's resident set and stops it above ``--cap-gb`` (the cell says so), waits
for ``--min-free-gb`` of available memory before starting one, and appends every result to a
JSON lines file, so a rerun skips the cells already there (``--force`` measures again).

Steps: ``stats`` (E[kk^T] of MEMIT's layers), ``trace``, ``rome``, ``memit-z`` (a whole MEMIT
edit of a few requests), ``memit100`` / ``memit1000`` (keys + layer updates with z given),
``alphaedit`` (null space + solve, z given), ``ft-linf`` / ``ft-fisher`` (one block),
``eval`` (one CounterFact case through the runner), ``save-load``, ``export``. Reductions
(steps, samples, blocks built) are flags and are written into each cell's notes.

    .venv/bin/python benchmarks/scale.py --out results/scale/table.md
    PYTHONPATH=/tmp/old-checkout .venv/bin/python benchmarks/scale.py --jsonl results/old.jsonl
    .venv/bin/python benchmarks/scale.py --models llama-3-8b --steps rome,alphaedit --force
    .venv/bin/python benchmarks/scale.py --small --models llama-3-8b --steps rome,export
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper modules next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_steps import ALL_SPECS, STEPS, Cell, edit_layers, shape_of  # noqa: E402

log = logging.getLogger("benchmarks.scale")

#: Blocks built by default: GPT-2 XL whole, the 6-8B models two blocks (the edit layer and
#: one above it for the loss), so that weights + one layer's statistics stay under ~8 GB.
DEFAULT_LAYERS = {"gpt2-xl": 48, "gpt-j-6b": 2, "llama-3-8b": 2, "qwen2.5-7b": 2}
SMALL_LAYERS = 4

#: What bounds each step's transient memory (beyond weights and statistics in hand), read
#: off the code: n requests, P prompts, T tokens in a chunk, d = d_mlp, D = d_model, V vocab.
BOUNDS = {
    "stats": "the sums (layers x d^2 float32), divided in place and written streamed "
    "(editing.statistics.tensor_file): ~1 d^2 x 4 B per layer, the result in hand afterwards",
    "trace": "the engine's rows x tokens x D states per chunk, one row's final logits [V]",
    "rome": "C factored in place in one column-major float64 buffer (d^2 x 8 B; none with "
    "mom2_adjustment off), k W read a block of rows at a time, + the v* graph",
    "memit-z": "MEMIT's solve (below) + the z graph of the requests' prompts",
    "memit100": "K [n x d] float64 + one d^2 float64 system (lambda C, K^T K added with "
    "addmm_, factored in place): d^2 x 8 B + n d x 8 B",
    "memit1000": "as memit100; K grows to n x d x 8 B",
    "alphaedit": "the null space in float64: the statistics' float64 copy, eigh's copy and "
    "LAPACK's workspace (~4.1 d^2 x 8 B, measured), then U_0 (a view) and P; the solve pushed "
    "through to [n, n] (no d^2 float64)",
    "alphaedit-f32": "as alphaedit with nullspace_dtype float32 (AlphaEdit's code's "
    "precision): eigh's copy and LAPACK's workspace ~3.2 d^2 x 4 B, then U_0 (a view) and "
    "P (d^2 x 4 B)",
    "alphaedit-solve": "AlphaEdit's solve alone (as in alphaedit)",
    "ft-linf": "the block's snapshot, its gradients and Adam's two moments (4 x block bytes: "
    "a float32 model's tensors are their own masters, the snapshot is the anchor), one "
    "tensor-sized temporary for the projection; at the end the snapshot and the Edit's deltas",
    "ft-fisher": "as ft-linf + the block's Fisher (1 x block bytes, in hand for the run; "
    "before it, its sums and the gradients, combined in place and written streamed)",
    "eval": "the ROME edit + scoring + the runner's weight checks (each block tensor copied "
    "to the host to hash it, one at a time)",
    "save-load": "applying: the delta matrix, the saved original and the sum (3 d D x 4 B)",
    "export": "applying (as save-load); save_pretrained writes tensor by tensor",
}


# --------------------------------------------------------------------------- memory watch


def available_gb() -> float:
    """MemAvailable from /proc/meminfo, GB."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def _child_rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def wait_for_memory(need_gb: float, max_wait_s: float) -> float:
    """Wait until ``need_gb`` is available (or ``max_wait_s`` passed); the GB available."""
    t0 = time.monotonic()
    free = available_gb()
    while free < need_gb and time.monotonic() - t0 < max_wait_s:
        log.info("only %.1f GB available (want %.1f): waiting", free, need_gb)
        time.sleep(20)
        free = available_gb()
    return free


def run_worker(cell: Cell, cap_gb: float, timeout_s: float) -> dict[str, Any]:
    """Run one cell in a fresh process, stopped above ``cap_gb`` resident or after
    ``timeout_s``; its result (or the reason there is none)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = Path(fh.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(cell))]
    cmd += ["--result", str(result_path)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    seen, stopped = 0.0, ""
    ru: Any = None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        seen = max(seen, _child_rss_gb(proc.pid))
        elapsed = time.monotonic() - t0
        if not stopped and (seen > cap_gb or elapsed > timeout_s):
            stopped = f"over {cap_gb:g} GB" if seen > cap_gb else f"over {timeout_s:g} s"
            log.warning("%s %s: %s, stopping it", cell.model, cell.step, stopped)
            proc.kill()
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    child_peak = ru.ru_maxrss * 1024 / 1e9  # includes the model's build
    out: dict[str, Any] = {"wall_seconds": round(wall, 1), "process_peak_gb": round(child_peak, 2)}
    try:
        got = json.loads(result_path.read_text()) if result_path.stat().st_size else {}
    finally:
        result_path.unlink(missing_ok=True)
    if stopped:
        out.update(status=f"{stopped}, stopped after {wall:.0f} s", peak_gb=round(seen, 2))
        keep = ("built_gb", "in_hand_gb", "weights_gb", "notes", "code")
        out.update({k: got[k] for k in keep if k in got})
    elif got.get("status") == "ok":
        out.update(got)
    elif got.get("status") == "running":  # killed from outside (e.g. the kernel's OOM killer)
        out.update(got, status=f"killed (exit code {proc.returncode})", peak_gb=round(seen, 2))
    else:
        out.update(got or {"status": f"worker exited with code {proc.returncode}"})
    return out


# --------------------------------------------------------------------------- results


def cell_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["step"], bool(row["small"]), int(row["layers"]))


def read_rows(path: Path) -> dict[tuple, dict[str, Any]]:
    """The JSON lines file's rows by cell (a later line for a cell replaces an earlier one)."""
    rows: dict[tuple, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[cell_key(row)] = row
    return rows


def describe(key: str, small: bool, layers: int) -> str:
    """``2/32 L, d 4096, mlp 14336, 32h/8kv, V 128256``."""
    full = ALL_SPECS[key].real if not small else shape_of(key, True, 10**6)
    s = shape_of(key, small, layers)
    d_mlp = s.get("d_mlp", 4 * int(s["d_model"]))
    heads = f"{s['heads']}h" + (f"/{s['kv_heads']}kv" if "kv_heads" in s else "")
    return (
        f"{s['layers']}/{full['layers']} L, d {s['d_model']}, mlp {d_mlp}, {heads}, V {s['vocab']}"
    )


def _num(row: dict[str, Any], key: str) -> str:
    """A cell: seconds to 0.1 from 10 s and to 3 significant digits below 1 s (a step of a
    few milliseconds is not shown as 0.00); everything else to 0.01."""
    v = row.get(key)
    if v is None:
        return "-"
    if key == "seconds":
        return f"{v:.1f}" if v >= 10 else f"{v:.3g}" if v < 1 else f"{v:.2f}"
    return f"{v:.2f}"


def _note(row: dict[str, Any]) -> str:
    notes = [str(row.get("notes", ""))]
    extra = row.get("extra") or {}
    if "overhead_pct_of_edit" in extra:
        notes.append(
            f"edit {extra['edit_seconds']} s, scoring {extra['scoring_seconds']} s, overhead "
            f"{extra['overhead_seconds']} s = {extra['overhead_pct_of_edit']} % of the edit"
        )
    if "seconds_projection" in extra:
        notes.append(
            f"null space {extra['seconds_projection']} s (dims {extra['null_space_dims']})"
        )
    if "seconds_updates" in extra:
        notes.append(f"keys + updates {extra['seconds_updates']} s")
    if extra.get("seconds_targets") is not None:
        notes.append(f"z {extra['seconds_targets']} s, layers {extra['seconds_layers']} s")
    if row.get("status", "ok") != "ok":
        notes.insert(0, f"**{row['status']}**")
    return "; ".join(n for n in notes if n).replace("|", "/")


def _lower_bound(row: dict[str, Any]) -> str:
    """A stopped cell's transient is at least its last resident size minus what it held."""
    if str(row.get("status", "")).startswith(("over", "stopped", "killed")):
        if row.get("in_hand_gb") is not None and row.get("peak_gb") is not None:
            return f"> {row['peak_gb'] - row['in_hand_gb']:.2f}"
    return "-"


def render(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table (one row per cell) and the steps' bounds."""
    head = ["model", "shape (built/real L, d, d_mlp, heads, V)", "weights GB", "step", "s",
            "peak GB", "in hand GB", "transient GB", "notes"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r.get("status", "ok") == "ok"
        cells = [
            r["model"] + (" (small)" if r["small"] else ""),
            describe(r["model"], r["small"], r["layers"]),
            _num(r, "weights_gb"),
            r["step"],
            _num(r, "seconds") if ok else "-",
            _num(r, "peak_gb"),
            _num(r, "in_hand_gb"),
            _num(r, "transient_gb") if ok else _lower_bound(r),
            _note(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    steps = sorted({r["step"] for r in rows}, key=list(STEPS).index)
    lines += ["", "Transient bounds (read off the code):", ""]
    lines += [f"* `{s}`: {BOUNDS[s]}" for s in steps]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def parse_layers(text: str | None, models: Sequence[str], small: bool) -> dict[str, int]:
    """``--layers``: one number for every model, or ``model=N,...`` over the defaults."""
    out = {m: SMALL_LAYERS if small else DEFAULT_LAYERS[m] for m in models}
    if not text:
        return out
    if "=" not in text:
        return {m: int(text) for m in models}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if name.strip() not in out:
            raise SystemExit(f"scale.py: --layers names an unknown model {name!r}")
        out[name.strip()] = int(n)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=",".join(ALL_SPECS), help="comma list of models")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--layers", default=None, help="blocks built: N, or model=N,... (see docs)")
    ap.add_argument("--small", action="store_true", help="tiny shapes of the same architectures")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="results file (default results/scale/cells.jsonl; small: ..._small)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for tokenizers and the cache (default beside --jsonl)",
    )
    ap.add_argument("--force", action="store_true", help="measure cells already in --jsonl")
    ap.add_argument(
        "--table-only", action="store_true", help="measure nothing: the table of what is on file"
    )
    ap.add_argument("--cap-gb", type=float, default=11.0, help="stop a worker above this RSS")
    ap.add_argument(
        "--min-free-gb",
        type=float,
        default=None,
        help="available memory to wait for before a cell (default 14; small 0)",
    )
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per cell at most")
    ap.add_argument("--stats-tokens", type=int, default=None, help="default 2048 (small 256)")
    ap.add_argument("--trace-samples", type=int, default=2)
    ap.add_argument(
        "--trace-kinds",
        default=None,
        help="default resid,mlp,attn (GPT-2 XL whole: resid, 1 sample)",
    )
    ap.add_argument("--vstar-steps", type=int, default=3, help="ROME v* / MEMIT z steps")
    ap.add_argument("--z-requests", type=int, default=2, help="requests of the memit-z cell")
    ap.add_argument("--ft-steps", type=int, default=3)
    ap.add_argument("--fisher-sequences", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jsonl is None:
        args.jsonl = Path("results/scale") / ("cells_small.jsonl" if args.small else "cells.jsonl")
    if args.work is None:
        args.work = args.jsonl.parent / (args.jsonl.stem + "_work")
    if args.min_free_gb is None:
        args.min_free_gb = 0.0 if args.small else 14.0
    if args.stats_tokens is None:
        args.stats_tokens = 256 if args.small else 2048
    return args


def cells(args: argparse.Namespace) -> list[Cell]:
    """Every cell the flags ask for, in table order."""
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    steps = [s.strip().lower() for s in args.steps.split(",") if s.strip()]
    bad = [m for m in models if m not in ALL_SPECS] + [s for s in steps if s not in STEPS]
    if bad or not models or not steps:
        raise SystemExit(f"scale.py: unknown model(s)/step(s) {bad}; see --help")
    layers = parse_layers(args.layers, models, args.small)
    out = []
    for m in models:
        n = layers[m]
        if n < 2:
            raise SystemExit(f"scale.py: {m}: build at least 2 blocks (the loss reads above)")
        whole = not args.small and n >= int(ALL_SPECS[m].real["layers"])
        kinds = args.trace_kinds or ("resid" if whole else "resid,mlp,attn")
        base = Cell(
            model=m, step="", small=args.small, layers=n, work=str(args.work.resolve()),
            stats_tokens=args.stats_tokens,
            trace_samples=1 if whole and not args.trace_kinds else args.trace_samples,
            trace_kinds=tuple(k.strip() for k in kinds.split(",")),
            vstar_steps=args.vstar_steps, z_requests=args.z_requests, ft_steps=args.ft_steps,
            fisher_sequences=args.fisher_sequences,
        )  # fmt: skip
        edit_layers(m, args.small, n)
        out += [replace(base, step=s) for s in steps]
    return out


def _code_root() -> str:
    import tracing

    return str(Path(tracing.__file__).resolve().parent.parent)


def commit_of(root: str) -> str:
    """``git rev-parse --short HEAD`` of the checkout the workers import (``?`` if none)."""
    try:
        got = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return got.stdout.strip()


def worker_main(args: argparse.Namespace) -> None:
    """One cell, in this process; its JSON result to ``--result``."""
    spec = json.loads(args.worker)
    spec["trace_kinds"] = tuple(spec["trace_kinds"])
    cell = Cell(**spec)
    os.environ["FACTSCOPE_CACHE"] = str(Path(cell.work) / "cache")
    Path(cell.work).mkdir(parents=True, exist_ok=True)
    from scale_steps import run_cell

    assert args.result is not None
    result: Path = args.result

    def partial(known: dict[str, Any]) -> None:
        result.write_text(json.dumps({**known, "code": _code_root()}))

    try:
        out = {"status": "ok", **run_cell(cell, partial)}
    except Exception as exc:  # a failure is a cell, never a crash of the table
        from tracing.memory import is_out_of_memory

        first = (str(exc).strip().splitlines() or [""])[0][:160]
        out = {
            "status": "OOM" if is_out_of_memory(exc) else f"error: {type(exc).__name__}: {first}"
        }
        log.exception("%s %s failed", cell.model, cell.step)
    out["code"] = _code_root()
    result.write_text(json.dumps(out))


def main(argv: Sequence[str] | None = None) -> str:
    """Measure the cells not yet in ``--jsonl``; print the table (and write ``--out``)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.worker is not None:
        worker_main(args)
        return ""
    todo = cells(args)
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = read_rows(args.jsonl)
    for cell in todo:
        key = (cell.model, cell.step, cell.small, cell.layers)
        if args.table_only:
            continue
        if key in done and not args.force:
            log.info("%s %s: already measured, skipped", cell.model, cell.step)
            continue
        free = wait_for_memory(args.min_free_gb, 900)
        log.info("%s %s: measuring (%.1f GB available)", cell.model, cell.step, free)
        got = run_worker(cell, args.cap_gb, args.timeout)
        row = {
            "model": cell.model, "step": cell.step, "small": cell.small, "layers": cell.layers,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "commit": commit_of(str(got.get("code", ""))) if got.get("code") else "?",
            "available_gb_at_start": round(free, 1), "settings": asdict(cell), **got,
        }  # fmt: skip
        if "notes" not in row:
            row["notes"] = ""
        with args.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done[key] = row
        log.info("%s %s: %s", cell.model, cell.step, {k: row.get(k) for k in
                 ("status", "seconds", "peak_gb", "transient_gb")})  # fmt: skip
    rows = [done[k] for c in todo if (k := (c.model, c.step, c.small, c.layers)) in done]
    table = render(rows)
    print(table, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
