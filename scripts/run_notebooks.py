"""Execute the notebooks in place with their own parameters, so that they are stored with
their outputs (heatmaps, tables) and a web page shows them.

    .venv/bin/python scripts/run_notebooks.py            # all four
    .venv/bin/python scripts/run_notebooks.py 03_editing # one (name without .ipynb)

The tests execute the same notebooks at smaller sizes (tests/test_notebooks.py); this script
is what refreshes the stored outputs after a change.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
log = logging.getLogger("run_notebooks")


def run(path: Path, timeout: int) -> float:
    """Execute ``path`` top to bottom in a fresh kernel and write it back with its outputs;
    returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        env=env,
    )
    t0 = time.perf_counter()
    client.execute()
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main() -> int:
    """Run the named notebooks (default: all), in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = [NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in args.names] or sorted(
        NOTEBOOKS.glob("*.ipynb")
    )
    for path in paths:
        if not path.is_file():
            print(f"error: no notebook {path}", file=sys.stderr)
            return 2
    for path in paths:
        log.info("running %s", path.name)
        log.info("%s: %.0f s", path.name, run(path, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
