"""benchmarks/gpu.py: its tiny-shape run on the CPU goes through every measured code path
(trace, ROME, MEMIT, statistics) and prints one table row per model. No timed assertions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    return load_script("benchmarks/gpu.py")


def _rows(table: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert set(lines[1].replace("|", "")) == {"-"}, "second line is the header rule"
    return cells[0], cells[2:]


def _positive(cell: str) -> float:
    value = float(cell.replace(",", ""))  # a ValueError here means an error/OOM cell
    assert value > 0
    return value


def test_small_cpu_run_measures_every_column(tmp_path):
    # A child process: the suite's run-time type checking (jaxtyping/beartype hooks on the
    # library) would make this run several times slower in-process.
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(SCRIPT), "--small", "--device", "cpu"]
    cmd += ["--models", "gpt2-xl,llama-3-8b", "--memit-sizes", "4", "--stats-tokens", "512"]
    cmd += ["--rome-edits", "1", "--threads", "1", "--out", str(out)]  # 2 shared cores
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.strip()
    assert table.startswith("|") and table == out.read_text().strip(), "stdout is the table"

    header, rows = _rows(table)
    assert len(rows) == 2
    assert [r[0] for r in rows] == ["random-gpt2-xl-small", "random-llama-3-8b-small"]
    col = {h: i for i, h in enumerate(header)}
    trace = next(h for h in header if h.startswith("trace"))
    stats = next(h for h in header if h.startswith("statistics"))
    for row in rows:
        assert len(row) == len(header)
        assert row[col["dtype"]] == "float32" and row[col["device"]] == "cpu"
        for name in (trace, "ROME s/edit", "MEMIT 4 s/request", stats):
            _positive(row[col[name]])
        assert row[col["peak GPU memory (GiB)"]].startswith("n/a")
    assert "8L d128 8h/2kv" in rows[1][col["shape"]]


def test_real_shapes_on_cpu_are_refused(gpu):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--device", "cpu", "--models", "gpt-j-6b"])
    message = str(exc.value)
    assert "--small" in message and "\n" not in message


def test_bad_flags_are_refused(gpu):
    with pytest.raises(SystemExit, match="unknown model"):
        gpu.main(["--small", "--device", "cpu", "--models", "gpt-5"])
    with pytest.raises(SystemExit, match="memit-sizes"):
        gpu.main(["--small", "--device", "cpu", "--memit-sizes", "ten"])


def test_a_failing_measurement_becomes_a_cell(gpu):
    cpu = torch.device("cpu")

    def broken() -> float:
        raise ValueError("no | luck\nsecond line")

    def oom() -> float:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    assert gpu.guarded("x", broken, cpu) == "error: ValueError: no / luck"
    assert gpu.guarded("x", oom, cpu) == "OOM"
    assert gpu.guarded("x", lambda: 1234.5, cpu) == "1,234"
    assert gpu.guarded("x", lambda: 0.01234, cpu) == "0.0123"


def test_real_shapes_are_the_published_ones(gpu):
    """The real configs, checked on the meta device (no memory): parameter counts of GPT-2 XL
    (tied embeddings), GPT-J-6B and Llama-3-8B."""
    from transformers import AutoModelForCausalLM

    expected = {"gpt2-xl": 1.56e9, "gpt-j-6b": 6.05e9, "llama-3-8b": 8.03e9}
    for key, n in expected.items():
        spec = gpu.SPECS[key]
        config = gpu.hf_config(spec, spec.real)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - n) / n < 0.01, (key, count)


SMALL_ARGS = ["--small", "--device", "cpu", "--models", "gpt2-xl", "--memit-sizes", "4"]
SMALL_ARGS += ["--stats-tokens", "512", "--rome-edits", "1"]


def _inject(gpu, monkeypatch, **failing: Exception) -> None:
    """The --small path with the measurements stubbed (fast), the ones in ``failing``
    raising their exception."""

    def stub(name: str):
        def measure(*_a) -> float:
            if name in failing:
                raise failing[name]
            return 1.5

        return measure

    for name in ("time_trace", "time_stats", "time_rome", "time_memit"):
        monkeypatch.setattr(gpu, name, stub(name))


def test_a_failed_cell_prints_its_traceback_and_fails_the_run(gpu, monkeypatch, capsys, caplog):
    _inject(gpu, monkeypatch, time_rome=ValueError("injected failure"))
    with pytest.raises(SystemExit) as stop:
        gpu.main(SMALL_ARGS)
    assert stop.value.code != 0
    message = str(stop.value)
    assert "1 measurement(s) failed" in message and "ROME" in message and "\n" not in message
    header, rows = _rows(capsys.readouterr().out.strip())  # the table is still printed
    col = {h: i for i, h in enumerate(header)}
    assert rows[0][col["ROME s/edit"]] == "error: ValueError: injected failure"
    assert rows[0][col["MEMIT 4 s/request"]] == "1.5"
    logged = [r for r in caplog.records if r.exc_info and "injected failure" in str(r.exc_info[1])]
    assert len(logged) == 1 and logged[0].exc_info[2] is not None  # the full traceback


def test_out_of_memory_fails_the_run_unless_allowed(gpu, monkeypatch, capsys):
    _inject(gpu, monkeypatch, time_trace=torch.OutOfMemoryError("CUDA out of memory."))
    with pytest.raises(SystemExit, match="1 measurement"):
        gpu.main(SMALL_ARGS)
    capsys.readouterr()
    table = gpu.main([*SMALL_ARGS, "--allow-oom"])
    header, rows = _rows(table)
    assert rows[0][header.index(next(h for h in header if h.startswith("trace")))] == "OOM"
