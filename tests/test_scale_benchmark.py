"""benchmarks/scale.py: the tiny-shape run measures a cell in its own process, prints the
table and resumes from its JSON lines file; the peak-memory reading it relies on moves with
an allocation. No timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _table_rows(table: str) -> list[list[str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[2:]]


def test_peak_reset_then_allocation_is_seen():
    steps = load_script("benchmarks/scale_steps.py")
    assert steps.reset_peak(), "the kernel refused clear_refs: peaks would include the build"
    start = steps.resident_gb()
    assert abs(steps.peak_gb() - start) < 0.05  # the peak was brought down to the RSS
    block = torch.ones(50_000_000)  # 0.2 GB, touched
    assert steps.peak_gb() - start >= 0.19
    del block
    assert steps.reset_peak() and steps.peak_gb() < start + 0.1


def test_small_run_prints_table_and_resumes(tmp_path):
    jsonl, out = tmp_path / "cells.jsonl", tmp_path / "table.md"
    # A row already on file for "export": the run must keep it and measure only save-load.
    kept = {"model": "gpt-j-6b", "step": "export", "small": True, "layers": 3, "status": "ok"}
    kept.update(seconds=123.0, peak_gb=9.87, in_hand_gb=1.0, transient_gb=0.5, weights_gb=0.01)
    kept["notes"] = "kept from an earlier run"
    jsonl.write_text(json.dumps(kept) + "\n")
    cmd = [sys.executable, str(SCRIPT), "--small", "--models", "gpt-j-6b", "--layers", "3"]
    cmd += ["--steps", "save-load,export", "--jsonl", str(jsonl), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.strip()
    assert table.startswith("| model") and table == out.read_text().strip()
    rows = _table_rows(table.split("\n\n")[0])
    assert [r[3] for r in rows] == ["save-load", "export"]
    assert rows[0][1] == "3/8 L, d 128, mlp 512, 4h, V 8192"  # gpt-j's d_mlp: 4 d_model
    assert float(rows[0][4]) > 0 and float(rows[0][5]) >= float(rows[0][6]) > 0
    assert rows[1][4] == "123.0" and rows[1][5] == "9.87", "the kept row was measured again"
    assert "`save-load`" in table and "`export`" in table  # the bounds section

    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == 2 and lines[1]["step"] == "save-load" and lines[1]["status"] == "ok"
    assert Path(lines[1]["code"]) == SCRIPT.parents[1]  # the workers imported this checkout
    assert lines[1]["peak_reset"] is True
