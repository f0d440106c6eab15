"""Data-parallel runs: ``torchrun --nproc-per-node 2`` (gloo on the CPU) gives what one process
gives, for the statistics, a dataset trace and evaluations (ROME sharded by case, MEMIT with
its z optimisation sharded); ranks started differently, or a failing rank, stop every rank
with the error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tracing.distributed import RankFailed, Ranks, together

TOY_HP = {
    "rome": {"layer": 1, "target": {"num_steps": 3, "lr": 0.5}, "mom2_n_tokens": 2000},
    "memit": {
        "layers": [0, 1],
        "target": {"num_steps": 3, "lr": 0.5},
        "mom2_n_tokens": 2000,
        "mom2_update_weight": 10.0,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FACTSCOPE_CACHE": str(tmp_path / "cache"),
        "MASTER_ADDR": "127.0.0.1",
    }


def _factscope(args: list[str], tmp_path: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    """``python -m factscope ARGS`` in one process, or under torchrun with ``ranks``."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "factscope", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            f"--master-port={_free_port()}",
            "-m",
            "factscope",
            *args,
        ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_statistics_on_two_ranks_equal_one_process(toy_dirs, tmp_path):
    common = ["stats", "--layers", "0,2", "--model", toy_dirs["gpt2"], "--tokens", "3000"]
    common += ["--seq-len", "64", "--batch-size", "2", "--no-progress"]
    _ok(_factscope([*common, "--cache-dir", str(tmp_path / "one")], tmp_path))
    _ok(_factscope([*common, "--cache-dir", str(tmp_path / "two")], tmp_path, ranks=2))
    for layer in (0, 2):
        (a,) = (tmp_path / "one").glob(f"*/*/layer_{layer}.safetensors")
        (b,) = (tmp_path / "two").glob(f"*/*/layer_{layer}.safetensors")
        meta_a = json.loads(a.with_suffix(".json").read_text())
        meta_b = json.loads(b.with_suffix(".json").read_text())
        assert meta_a["count"] == meta_b["count"] == 3000
        torch.testing.assert_close(
            load_file(str(b))["mom2"], load_file(str(a))["mom2"], rtol=1e-5, atol=1e-6
        )
    assert not list((tmp_path / "two").glob("*/*/partial*")), "rank checkpoints left behind"


def test_dataset_trace_on_two_ranks_equals_one_process(toy_dirs, tmp_path):
    common = ["trace-dataset", "--model", toy_dirs["llama"], "--n-facts", "4", "--all-facts"]
    common += ["--samples", "2", "--noise", "0.5", "--no-progress"]
    _ok(_factscope([*common, "--out", str(tmp_path / "one")], tmp_path))
    _ok(_factscope([*common, "--out", str(tmp_path / "two")], tmp_path, ranks=2))
    a = json.loads((tmp_path / "one" / "average_effects.json").read_text())
    b = json.loads((tmp_path / "two" / "average_effects.json").read_text())
    assert a == b
    assert len(list((tmp_path / "two" / "traces").glob("*.json"))) == 4
    assert any(v != 0 for c in a["effects"]["mlp"].values() for v in c)  # not vacuous


@pytest.mark.parametrize(("method", "extra"), [("rome", []), ("memit", ["--batch", "6"])])
def test_evaluation_on_two_ranks_equals_one_process(toy_dirs, tmp_path, method, extra):
    hp = tmp_path / f"{method}.json"
    hp.write_text(json.dumps({**TOY_HP[method], "context_templates": [[5, 2]]}))
    common = ["eval", "--method", method, "--hparams", str(hp), "--n-cases", "6", *extra]
    common += ["--model", toy_dirs["gpt2"], "--all-cases", "--gen-tokens", "0", "--no-progress"]
    _ok(_factscope([*common, "--out", str(tmp_path / "one")], tmp_path))
    two = _ok(_factscope(["-v", *common, "--out", str(tmp_path / "two")], tmp_path, ranks=2))
    rows = {}
    for run in ("one", "two"):
        folder = tmp_path / run / f"counterfact10_{method}"
        rows[run] = {
            r["case_id"]: r
            for r in map(json.loads, (folder / "cases.jsonl").read_text().splitlines())
        }
        assert not list(folder.glob("cases.rank*"))  # merged into cases.jsonl
    assert sorted(rows["one"]) == sorted(rows["two"]) and len(rows["one"]) == 6
    for case, row in rows["one"].items():
        for key, value in row.items():
            if key.startswith("post_") and isinstance(value, float):
                assert abs(rows["two"][case][key] - value) < 1e-5, (case, key)
    if method == "memit":  # the z optimisation really was split across the ranks
        assert "rank 0 optimises 3 of 6 requests" in two.stderr
        assert "rank 1 optimises 3 of 6 requests" in two.stderr


def test_ranks_started_differently_stop_with_one_error(toy_dirs, tmp_path):
    port = _free_port()
    procs = []
    for rank, n in ((0, "2"), (1, "3")):
        env = {**_env(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env["MASTER_PORT"] = str(port)
        cmd = [sys.executable, "-m", "factscope", "trace-dataset", "--n", n, "--all-facts"]
        cmd += ["--model", toy_dirs["gpt2"], "--out", str(tmp_path / f"r{rank}")]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2
        assert err.strip().splitlines()[-1].startswith("error: torchrun ranks were started")


def _failing_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:

        def work() -> int:
            if rank == 1:
                raise ValueError("bad shard")
            return rank

        together(work)
        result = "no error"
    except RankFailed as exc:
        result = f"RankFailed: {exc}"
    except ValueError as exc:
        result = f"ValueError: {exc}"
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.txt").write_text(result)


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    mp.spawn(_failing_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "1.txt").read_text() == "ValueError: bad shard"
    assert (tmp_path / "0.txt").read_text() == "RankFailed: rank 1 failed: ValueError: bad shard"


def test_shards_are_disjoint_and_complete():
    items = list(range(11))
    shards = [Ranks(r, 3).shard(items) for r in range(3)]
    assert sorted(i for s in shards for i in s) == items
    assert Ranks().shard(items) == items


def _nccl_init(monkeypatch, local_rank: int, local_world: int) -> list[int]:
    """A torchrun rank of a two-rank run (``local_world`` of them on this machine) whose
    CUDA and NCCL are stand-ins: returns the list its ``torch.cuda.set_device`` calls are
    recorded in."""
    import tracing.distributed as td

    for name, value in {
        "RANK": local_rank,
        "LOCAL_RANK": local_rank,
        "WORLD_SIZE": 2,
        "LOCAL_WORLD_SIZE": local_world,
    }.items():
        monkeypatch.setenv(name, str(value))
    calls: list[int] = []
    monkeypatch.setattr(td.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(td.torch.cuda, "set_device", lambda index: calls.append(int(index)))
    monkeypatch.setattr(td.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(td.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(td, "ranks", lambda: Ranks(local_rank, 2))
    return calls


@pytest.mark.parametrize(
    ("device", "want"), [(None, 0), ("auto", 0), ("cuda", 0), ("cpu", 0), ("cuda:1", 1)]
)
def test_an_explicit_cuda_device_wins_over_local_rank(monkeypatch, device, want):
    """One rank on each of two machines: ``cuda:1`` binds GPU 1; anything else binds
    LOCAL_RANK (0), as before."""
    from tracing.distributed import init_from_env

    calls = _nccl_init(monkeypatch, local_rank=0, local_world=1)
    init_from_env(device=device)
    assert calls == [want]


def test_an_explicit_cuda_device_shared_by_local_ranks_is_refused(monkeypatch):
    from tracing.distributed import init_from_env
    from tracing.errors import InvalidInput

    calls = _nccl_init(monkeypatch, local_rank=1, local_world=2)
    with pytest.raises(InvalidInput, match="cuda:0"):
        init_from_env(device="cuda:0")
    assert calls == []
    init_from_env(device="cuda")
    assert calls == [1]
