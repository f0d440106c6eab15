"""benchmarks/ft_study.py (Zhu et al.'s study): ``--report`` prints the table of the rows of
the asked numbers of facts and draws their plot without a model, and a study folder made
with other settings is refused before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return load_script("benchmarks/ft_study.py")


def _row(k: int, blocks: str, constraint: str, es: float) -> dict:
    return {
        "k": k,
        "blocks": blocks,
        "constraint": constraint,
        "efficacy": es,
        "paraphrase": es / 2,
        "strict_efficacy": es / 3,
        "neighborhood": 1 - es / 4,
        "known_top1": 0.5,
        "known_n": 10,
        "seconds": 1.5,
    }


def test_report_tables_and_plots_only_the_asked_k(
    study: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = [_row(k, "-", "unedited", 0.0) for k in (32, 128, 512)]
    rows += [
        _row(k, b, c, 0.9)
        for k in (32, 128)
        for b in ("0", "17", "all")
        for c in ("linf", "fisher")
    ]
    rows.append(_row(512, "0", "linf", 0.25))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot = tmp_path / "plot.png"
    study.main(["--k", "32,128", "--report", "--out", str(tmp_path), "--plot", str(plot)])
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in out]
    lines = [c for c in cells if len(c) == 9][1:]  # the study's table; the best blocks follow
    assert sum(len(c) == 5 for c in cells) == 1 + 2 * 2  # best block per K and constraint
    assert len(lines) == 2 * (1 + 3 * 2)  # per K: the unedited row and 3 targets x 2
    assert {ln[0] for ln in lines} == {"32", "128"}
    assert all(ln[3] == "90.0" for ln in lines if ln[2] != "unedited")  # ES in percent
    # the order docs/RESULTS.md shows: unedited first, blocks by number, all last, l-inf first
    assert [(ln[1], ln[2]) for ln in lines[:7]] == [("-", "unedited")] + [
        (b, c) for b in ("0", "17", "all") for c in ("linf", "fisher")
    ]
    assert plot.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no rows"):
        study.main(["--k", "2048", "--report", "--out", str(tmp_path)])


def test_best_block_keeps_most_unmodified_facts_among_those_that_write_them(
    study: ModuleType,
) -> None:
    def row(k: int, blocks: str, constraint: str, es: float, ns: float) -> dict:
        return {**_row(k, blocks, constraint, es), "neighborhood": ns}

    rows = [
        row(32, "-", "unedited", 0.1, 0.99),
        row(32, "0", "linf", 0.95, 0.60),
        row(32, "5", "linf", 0.85, 0.90),  # keeps more, but does not write the facts
        row(32, "9", "linf", 1.00, 0.50),
        row(32, "all", "linf", 1.00, 0.95),  # not a single block
        row(32, "0", "fisher", 0.50, 0.70),
        row(128, "17", "linf", 0.92, 0.40),
        row(128, "3", "linf", 0.90, 0.45),  # exactly at the bar counts
    ]
    lines = [ln for ln in study._best(rows).splitlines() if ln.startswith("| ")][1:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert [c[:3] for c in cells] == [
        ["32", "linf", "0"],
        ["32", "fisher", "none"],
        ["128", "linf", "3"],
    ]
    assert cells[0][3:] == ["95.0", "60.0"]


def test_other_settings_are_refused_before_the_model(study: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text(json.dumps({"model": "gemma-3-270m", "lr": 1.0}))
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--k", "32", "--out", str(tmp_path), "--model", "no-such-model"])
    # which rows and where the report goes are not settings: a folder made by the defaults
    # is resumed with other K, blocks or plot (the model is loaded next: refused by name)
    (tmp_path / "settings.json").unlink()
    with pytest.raises(Exception, match="no-such-model"):
        study.main(["--out", str(tmp_path), "--model", "no-such-model"])
    # the settings a study records (studies made before keep resuming): how, not which rows
    how = {"model", "params", "epsilon", "fisher_weight", "fisher_sequences", "fisher_facts"}
    how |= {"lr", "steps", "batch_size", "split", "dataset", "known"}
    assert set(json.loads((tmp_path / "settings.json").read_text())) == how
    with pytest.raises(Exception, match="no-such-model"):
        study.main(
            ["--k", "512", "--blocks", "9", "--plot", "x.png", "--out", str(tmp_path)]
            + ["--model", "no-such-model"]
        )


def test_cases_edited_together_never_conflict(study: ModuleType, monkeypatch) -> None:
    import editing.evaluation.tasks as tasks
    from editing.requests import EditRequest

    reqs = [
        EditRequest("{} is a twin city of", "Lyon", " Toronto", relation_id="P190"),
        EditRequest("{}'s twin city is", "Lyon", " Manila", relation_id="P190"),  # conflicts
        EditRequest("{} is a twin city of", "Lyon", " Toronto", relation_id="P190"),  # repeat
        EditRequest("{} plays", "Messi", " cricket", relation_id="P641"),
        EditRequest("{} plays", "Kane", " golf", relation_id="P641"),
    ]
    monkeypatch.setattr(tasks, "load_cases", lambda dataset: ("cf", None, list(range(5))))
    monkeypatch.setattr(tasks, "split_cases", lambda label, cases, split: cases)

    class Task:
        def request(self, case: int) -> EditRequest:
            return reqs[case]

        def problem(self, model, case: int) -> None:
            return None

    assert study._cases(Task(), None, "counterfact", "tuning", 3) == [0, 3, 4]
    with pytest.raises(SystemExit, match="only 3 usable cases"):
        study._cases(Task(), None, "counterfact", "tuning", 4)
