"""Execute the notebooks top to bottom on the embedded model, with small parameters.

Each notebook's cell tagged ``parameters`` gets the overrides below appended (every overridden
name must already be a parameter there), a first cell checks that the kernel runs this
test's Python, and the notebook is run with nbclient in a fresh kernel (MPLBACKEND=Agg,
HF_HUB_OFFLINE=1). The notebooks ``assert`` their own invariants (an edit makes the new
target top-1, undo restores the weights bit-exactly, ...), so any failed assertion fails the
test; the tests below also check what the notebooks print and write.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 1800  # seconds per cell: generous, the CI machine is shared

pytestmark = [pytest.mark.model, pytest.mark.notebook]


def _parameter_names(source: str) -> set[str]:
    return {
        t.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def run_notebook(name: str, workdir: Path, **overrides) -> list[dict]:
    """Execute ``notebooks/<name>`` in ``workdir`` with parameter ``overrides``; returns the
    executed cells (raises nbclient's CellExecutionError on any error in a cell)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    cell = tagged[0]
    unknown = set(overrides) - _parameter_names(cell.source)
    assert not unknown, f"{name}: {sorted(unknown)} are not parameters of the notebook"
    lines = [f"{key} = {value!r}" for key, value in overrides.items()]
    cell.source += "\n\n# overrides injected by tests/test_notebooks.py\n" + "\n".join(lines)
    check = (
        "import sys\n"
        f"assert sys.prefix == {sys.prefix!r}, "
        "f'kernel runs {sys.executable}, not the test environment'"
    )
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # the kernel takes the test process's share of the cores (one thread per xdist worker)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        startup_timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)
    for c in nb.cells:
        assert c.get("outputs") is None or all(
            o.get("output_type") != "error" for o in c["outputs"]
        )
    return nb.cells


def text_of(cells: list[dict]) -> str:
    """Everything the code cells printed or returned as plain text."""
    out = []
    for c in cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                out.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


def count_mime(cells: list[dict], mime: str) -> int:
    return sum(mime in o.get("data", {}) for c in cells for o in c.get("outputs", []))


def test_notebooks_are_saved_executed_with_their_outputs():
    """The committed notebooks carry the outputs of one top-to-bottom run
    (scripts/run_notebooks.py), so a web page shows their heatmaps and tables: every code
    cell ran in order, none failed, and each notebook shows at least one figure."""
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in paths} >= {
        "01_causal_tracing.ipynb",
        "02_layer_selection.ipynb",
        "03_editing.ipynb",
        "04_evaluation.ipynb",
    }
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name} was not run in order"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], f"{path.name} failed"
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name} shows no figure"


def test_causal_tracing_notebook(tmp_path):
    cells = run_notebook(
        "01_causal_tracing.ipynb",
        tmp_path,
        SAMPLES=2,
        KINDS=("resid", "mlp"),
        SECOND_KINDS=("mlp",),
        WINDOWS=(),
        OUT_DIR=str(tmp_path / "figs"),
    )
    text = text_of(cells)
    assert re.search(r"' Seattle'\s+0\.4\d\d", text), "top-k should start with ' Seattle'"
    assert "answer:      ' Seattle'" in text
    mlp_peak = re.search(r"peak mlp  : token 3 ' Needle'", text)
    assert mlp_peak, "the MLP effect should peak at the last subject token ' Needle'"
    assert re.search(r"answer ' Paris'", text)
    assert count_mime(cells, "image/png") >= 2  # the two static heatmaps
    assert count_mime(cells, "application/vnd.plotly.v1+json") >= 1
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {
        "trace.png",
        "trace.svg",
        "trace.html",
    }


def test_layer_selection_notebook(tmp_path):
    out = tmp_path / "runs"
    cells = run_notebook(
        "02_layer_selection.ipynb",
        tmp_path,
        N_FACTS=2,
        SAMPLES=2,
        KINDS=("mlp",),
        K=3,
        OUT_DIR=str(out),
    )
    text = text_of(cells)
    assert "2 facts traced" in text and "2 traces on disk" in text
    assert len(list((out / "traces").glob("*.json"))) == 2
    chosen = json.loads((out / "layers.json").read_text())
    layers = chosen["layers"]
    assert chosen["k"] == 3 and layers == list(range(layers[0], layers[0] + 3))
    assert json.dumps(layers) in text
    assert count_mime(cells, "image/png") >= 2  # average effects, layer selection


def test_editing_notebook(tmp_path):
    cells = run_notebook(
        "03_editing.ipynb",
        tmp_path,
        SAMPLES=2,
        N_CASES=2,
        OUT_DIR=str(tmp_path / "edits"),
    )
    text = text_of(cells)
    assert "top-1 after the edit: ' London'" in text
    assert "weights restored bit-exact: True" in text
    assert "same weights as the original edit: True" in text
    assert "after the edit: answer ' London'" in text
    assert (tmp_path / "edits" / "rome_edit" / "edit.json").is_file()
    assert re.search(r"MEMIT, 2 edits at once", text)
    assert count_mime(cells, "image/png") >= 1
    assert count_mime(cells, "application/vnd.plotly.v1+json") >= 1


def test_evaluation_notebook(tmp_path):
    out = tmp_path / "results"
    cells = run_notebook(
        "04_evaluation.ipynb",
        tmp_path,
        N_CASES=1,
        GEN_TOKENS=4,
        SCALING_SIZES=(1,),
        SCALING_METHODS=("ft-l",),
        OUT_DIR=str(out),
    )
    text = text_of(cells)
    for method in ("none", "rome", "memit", "ft-l"):
        summary = json.loads((out / f"counterfact10_{method}" / "summary.json").read_text())
        assert summary["n"] == 1 and summary["method"] == method
        assert summary["edited"]["efficacy_success"] is not None
    table = next(
        o["data"]["text/markdown"]
        for c in cells
        for o in c.get("outputs", [])
        if "text/markdown" in o.get("data", {})
    )
    for label in ("unedited", "rome", "memit", "ft-l"):
        assert re.search(rf"^\| {label}( \(\d+ at once\))? \| 1 \|", table, re.M), table
    points = json.loads((out / "scaling" / "points.json").read_text())
    assert {(p["method"], p["n_edits"]) for p in points} == {("ft-l", 1), ("unedited", 1)}
    assert re.search(r"case \d+: '", text)
    assert count_mime(cells, "image/png") >= 2  # edit bars, scaling plot
