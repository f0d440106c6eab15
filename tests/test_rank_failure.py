"""One rank failing alone in a sharded MEMIT batch: under torchrun every rank of ``eval``
makes the same MEMIT edit with the z optimisation split between them, so an edit that fails
on one rank only (its share of the targets) must end the same way on every rank: the
batch's cases recorded as failed with that rank's reason, as in one process, and the run
going on in step to the next batch.

One torchrun launch (2 ranks, gloo) runs a small script: rank 1's first target optimisation
raises :class:`~tracing.errors.EditFailed`; each rank writes the rows it recorded per unit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import editing.evaluation.runner as runner
import editing.targets.objective as objective
from tracing.distributed import init_from_env, leave
from tracing.errors import EditFailed
from tracing.models import load_model

model_dir, out, hp = sys.argv[1:4]
here = init_from_env()
real_optimise, calls = objective._optimise, []

def flaky(*args, **kwargs):
    calls.append(1)
    if here.rank == 1 and len(calls) == 1:
        raise EditFailed("injected: rank 1's targets did not converge")
    return real_optimise(*args, **kwargs)

objective._optimise = flaky
real_unit, units = runner._run_unit, []

def recording(run, unit, todo):
    rows = real_unit(run, unit, todo)
    units.append([[r["case_id"], r.get("failed")] for r in rows])
    return rows

runner._run_unit = recording
model = load_model(model_dir)
try:
    s = runner.evaluate(model, method="memit", hparams=hp, n=4, batch=2, out_dir=out,
                        only_known=False, generation=None, progress=False)
    result = {"n": s.n, "n_failed": s.n_failed}
except Exception as exc:
    result = {"error": f"{type(exc).__name__}: {exc}"}
result["units"] = units
with open(f"{out}/rank{here.rank}.json", "w") as f:
    json.dump(result, f)
leave()
"""

HP = {
    "layers": [0, 1],
    "target": {"num_steps": 3, "lr": 0.5},
    "mom2_n_tokens": 2000,
    "mom2_update_weight": 10.0,
    "context_templates": [[5, 2]],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_memit_batch_failing_on_one_rank_is_recorded_alike_on_every_rank(toy_dirs, tmp_path):
    script, hp = tmp_path / "run.py", tmp_path / "memit.json"
    script.write_text(SCRIPT)
    hp.write_text(json.dumps(HP))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FACTSCOPE_CACHE": str(tmp_path / "cache"),
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    cmd += [f"--master-port={_free_port()}", str(script), toy_dirs["gpt2"], str(tmp_path), str(hp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    first, second = ranks[0]["units"]
    reason = "injected: rank 1's targets did not converge"
    assert [f for _, f in first] == [reason, reason]  # the whole batch, on both ranks
    assert [f for _, f in second] == [None, None]  # and the next batch edited, in step
    assert ranks[0]["n_failed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "counterfact10_memit" / "cases.jsonl").open()]
    assert sorted(r["case_id"] for r in rows if r.get("failed") == reason) == sorted(
        c for c, _ in first
    )
