"""Benchmark: loading the embedded model cold (GGUF dequantised, safetensors cache written)
against warm (read back from the cache), each in a fresh process with an empty
``$FACTSCOPE_CACHE`` for the cold run.

    .venv/bin/python benchmarks/load_speed.py [--model gemma-3-270m] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import time, torch
torch.set_num_threads({threads})
t = time.perf_counter()
from tracing.models import load_model
model = load_model({model!r})
print(time.perf_counter() - t)
"""


def timed_load(model: str, cache: str, threads: int) -> float:
    """Seconds to import factscope and load ``model`` in a fresh process using ``cache``."""
    env = dict(os.environ, FACTSCOPE_CACHE=cache)
    code = CHILD.format(model=model, threads=threads)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--repeats", type=int, default=2, help="warm loads to time")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold = timed_load(args.model, cache, args.threads)
        warm = [timed_load(args.model, cache, args.threads) for _ in range(args.repeats)]
    print(f"\n{args.model}: load in a fresh process (import + load), {args.threads} threads")
    print("| load | seconds |")
    print("|---|---|")
    print(f"| cold: GGUF dequantised, cache written | {cold:.1f} |")
    for i, w in enumerate(warm, 1):
        print(f"| warm #{i}: from the safetensors cache | {w:.1f} |")
    print(f"warm is {cold / min(warm):.1f}x faster")


if __name__ == "__main__":
    main()
