"""benchmarks/specificity_sweep.py: configurations parsed and resolved against the shipped Gemma
files (``"xF"`` scales the shipped value), refused before any model is loaded when wrong, rows
computed from a run's summary, and finished configurations skipped on a rerun."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from script_loader import load_script

from editing.hparams import defaults_dir
from tracing.errors import InvalidHparams, InvalidInput


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    return load_script("benchmarks/specificity_sweep.py")


def _shipped(method: str) -> dict:
    return json.loads((defaults_dir() / f"{method}_gemma-3-270m.json").read_text())


def test_parse_config_reads_json_values_and_plain_words(sweep: ModuleType) -> None:
    c = sweep.parse_config(
        "mine:ROME:kl_factor=x2; layer=3;context_templates=[[5,1]];kl_position=last"
    )
    assert (c.name, c.method) == ("mine", "rome")
    assert dict(c.overrides) == {
        "kl_factor": "x2",
        "layer": 3,
        "context_templates": [[5, 1]],
        "kl_position": "last",
    }
    assert dict(sweep.parse_config("plain:memit").overrides) == {}
    for bad in ("nomethod", ":rome:", "a:rome:layer"):
        with pytest.raises(InvalidInput):
            sweep.parse_config(bad)


def test_scaled_values_multiply_the_shipped_file(sweep: ModuleType) -> None:
    rome, memit = _shipped("rome"), _shipped("memit")
    got = sweep.resolve_overrides("rome", {"kl_factor": "x16", "weight_decay": "x4", "layer": 3})
    assert got == {
        "kl_factor": rome["target"]["kl_factor"] * 16,
        "weight_decay": rome["target"]["weight_decay"] * 4,
        "layer": 3,
    }
    got = sweep.resolve_overrides("memit", {"mom2_update_weight": "x10", "mom2_n_tokens": "x2"})
    assert got == {
        "mom2_update_weight": memit["mom2_update_weight"] * 10,
        "mom2_n_tokens": memit["mom2_n_tokens"] * 2,
    }
    assert isinstance(got["mom2_n_tokens"], int)


def test_bad_overrides_are_refused_by_name(sweep: ModuleType) -> None:
    with pytest.raises(InvalidHparams, match="kl_weight"):
        sweep.resolve_overrides("rome", {"kl_weight": 1.0})
    with pytest.raises(InvalidHparams, match="kl_position"):
        sweep.resolve_overrides("rome", {"kl_position": "x2"})  # scales a word
    with pytest.raises(InvalidHparams):
        sweep.resolve_overrides("rome", {"kl_position": "middle"})
    with pytest.raises(InvalidHparams):
        sweep.resolve_overrides("rome", {"layers": [2, 3]})  # ROME edits one layer
    C = sweep.SweepConfig
    with pytest.raises(InvalidInput, match="twice"):
        sweep.check_configs([C("a", "rome"), C("a", "memit")])
    with pytest.raises(InvalidInput, match="no overrides"):
        sweep.check_configs([C("base", "none", {"layer": 3})])


def test_every_shipped_configuration_changes_what_it_names(sweep: ModuleType) -> None:
    from editing.methods import get_method

    configs = [c for c in sweep.CONFIGS if sweep.available(c)]
    resolved = sweep.check_configs(configs)
    assert len(resolved) == len(configs) >= 20
    for c in configs:
        if c.method == "none":
            continue
        spec = get_method(c.method)
        default = spec.load_hparams("gemma-3-270m").to_dict()
        hp = spec.load_hparams("gemma-3-270m", **resolved[c.name]).to_dict()
        for key, value in resolved[c.name].items():
            if key == "layer" or key == "layers":
                key = "layer" if "layer" in hp else "layers"
            where = hp["target"] if key in hp["target"] else hp
            was = default["target"] if key in default["target"] else default
            assert where[key] == value, (c.name, key)
            assert was[key] != value, f"{c.name}: {key} is already {value} in the shipped file"


def _summary(es: float, ps: float, ns: float, ns0: float) -> Any:
    return SimpleNamespace(
        n=30,
        n_failed=0,
        edited={
            "efficacy_success": es,
            "paraphrase_success": ps,
            "neighborhood_success": ns,
            "neighborhood_magnitude": 0.05,
            "neighborhood_new_gain": 0.02,
        },
        unedited={"neighborhood_success": ns0, "neighborhood_magnitude": 0.1},
        seconds_per_edit_median=12.5,
        seconds_total=400.0,
    )


def test_row_table_and_plot(sweep: ModuleType, tmp_path: Path) -> None:
    c = sweep.SweepConfig("rome_x", "rome", {"kl_factor": "x4"}, "KL weight")
    row = sweep.summary_row(c, {"kl_factor": 0.25}, _summary(1.0, 0.9, 0.7, 0.775))
    assert row["ns_drop"] == pytest.approx(7.5)
    assert (row["es"], row["ps"], row["nm"], row["new_gain"]) == pytest.approx((100, 90, 5, 2))
    assert row["strict_es"] is None
    table = sweep.markdown_table([row])
    assert "| rome_x | KL weight | 100.0 | 90.0 | 70.0 | 7.5 | 5.0 | 2.0 | – | – | 12.5 |" in table
    m = sweep.SweepConfig("memit_y", "memit", {}, "default")
    rows = [row, sweep.summary_row(m, {}, _summary(1.0, 0.8, 0.74, 0.775))]
    out = sweep.report(rows, tmp_path, tmp_path / "sweep.png")
    assert out == (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_finished_configurations(sweep: ModuleType, tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []

    def fake_evaluate(model: Any, cfg: Any) -> Any:
        calls.append((cfg.name, cfg.hparams))
        assert (cfg.split, cfg.dataset, cfg.n, cfg.batch, cfg.generation) == (
            "tuning",
            "counterfact",
            4,
            4,
            None,
        )
        return _summary(1.0, 1.0, 0.8, 0.9)

    C = sweep.SweepConfig
    configs = [C("base", "none"), C("kl", "rome", {"kl_factor": "x2"}), C("mem", "memit")]
    kw = {"model": object(), "evaluate_fn": fake_evaluate}
    rows = sweep.run_sweep(configs, tmp_path, 4, **kw)
    kl = _shipped("rome")["target"]["kl_factor"] * 2
    assert calls == [("base", None), ("kl", {"kl_factor": kl}), ("mem", None)]
    assert [r["name"] for r in rows] == ["base", "kl", "mem"]
    calls.clear()
    assert sweep.run_sweep(configs, tmp_path, 4, **kw) == rows
    assert calls == []
    # another n or other overrides are another run
    configs[1] = C("kl", "rome", {"kl_factor": "x4"})
    sweep.run_sweep(configs, tmp_path, 4, **kw)
    assert [name for name, _ in calls] == ["kl"]
    calls.clear()
    sweep.run_sweep(
        configs, tmp_path, 5, **{**kw, "evaluate_fn": lambda m, c: _summary(1, 1, 1, 1)}
    )
    assert len(sweep.read_rows(tmp_path / "sweep.jsonl")) == 3


def test_subject_pool_holds_no_tuning_subject_nor_neighbour(sweep: ModuleType) -> None:
    from editing.evaluation.tasks import load_cases, split_cases

    label, _, cases = load_cases("counterfact")
    tuning = split_cases(label, cases, "tuning")
    pool = sweep.subject_pool(300)
    subjects = [c.record.subject for c in pool]
    assert len(subjects) == len(set(subjects)) == 300
    tuning_ids = {c.case_id for c in tuning}
    assert not tuning_ids & {c.case_id for c in pool}
    neighbours = [p for c in tuning for p in c.record.neighborhood_prompts]
    for s in subjects:  # a plain loop over every neighbourhood prompt
        assert s not in {c.record.subject for c in tuning}
        assert not any(s in p for p in neighbours), s
    C = sweep.SweepConfig
    with pytest.raises(InvalidInput, match="subject_weight"):
        sweep.check_configs([C("m", "memit", {}, subject_weight=0.5)])
    with pytest.raises(InvalidInput, match="subject_weight"):
        sweep.check_configs([C("r", "rome", {}, subject_weight=1.0)])


def test_a_failing_configuration_leaves_the_others(sweep: ModuleType, tmp_path: Path) -> None:
    def flaky(model: Any, cfg: Any) -> Any:
        if cfg.name == "bad":
            raise RuntimeError("boom")
        return _summary(1.0, 1.0, 0.8, 0.9)

    C = sweep.SweepConfig
    configs = [C("bad", "rome"), C("good", "memit")]
    rows = sweep.run_sweep(configs, tmp_path, 3, model=object(), evaluate_fn=flaky)
    assert [r["name"] for r in rows] == ["good"]
    assert set(sweep.read_rows(tmp_path / "sweep.jsonl")) == {"good"}
