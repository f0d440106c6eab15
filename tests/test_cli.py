"""The command line's bad-input table: every case exits 2 with one ``error:`` line naming
what is wrong, and the cases that can be checked without a model never load one."""

from __future__ import annotations

import json

import pytest

import tracing.models
from factscope.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: these errors must come before any model is loaded."""

    def refuse(*_a, **_k):
        pytest.fail("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tracing.models, "load_model", refuse)


@pytest.fixture
def files(tmp_path):
    existing = tmp_path / "a_file.txt"
    existing.write_text("not a folder")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    bad_records = tmp_path / "records.json"
    bad_records.write_text(json.dumps([{"case_id": 0, "prompt": "x"}]))
    return {
        "file": str(existing),
        "bad_json": str(bad_json),
        "bad_records": str(bad_records),
        "folder": str(tmp_path),
    }


CASES = {
    "trace onto an existing file": (
        ["trace", "The Space Needle is in", "--subject", "The Space Needle", "--out", "{file}"],
        "is an existing file",
    ),
    "eval with an unknown method": (["eval", "--method", "mend"], "unknown editing method"),
    "eval with a missing dataset": (
        ["eval", "--dataset", "{file}.missing.json"],
        "unknown dataset",
    ),
    "eval with a malformed dataset names the file": (
        ["eval", "--dataset", "{bad_json}", "--method", "none"],
        "bad.json",
    ),
    "eval with malformed records names the file": (
        ["eval", "--dataset", "{bad_records}", "--method", "none"],
        "records.json",
    ),
    "eval with bad layers": (["eval", "--layers", "five"], "bad layer spec"),
    "edit with an unknown method": (
        ["edit", "--requests", "{bad_json}", "--method", "mend", "--out", "x"],
        "unknown editing method",
    ),
    "edit with a missing requests file": (
        ["edit", "--requests", "{file}.nope", "--method", "rome", "--out", "x"],
        "does not exist",
    ),
    "edit with malformed requests": (
        ["edit", "--requests", "{bad_json}", "--method", "rome", "--out", "x"],
        "not valid JSON",
    ),
    "stats with bad layers": (["stats", "--layers", "1-x"], "bad layer spec"),
    "a device that is not here": (["predict", "Paris is in", "--device", "cuda:99"], "cuda:99"),
    "an unknown dtype": (["stats", "--layers", "1", "--dtype", "float8"], "unknown dtype"),
    "a device map naming a missing device": (
        ["trace-dataset", "--device-map", '{{"model.layers.0": "cuda:99"}}'],
        "cuda:99",
    ),
    "a device and a device map": (
        ["predict", "x", "--device", "cpu", "--device-map", '{{"model": "cpu"}}'],
        "not both",
    ),
    "a missing model folder": (["predict", "x", "--model", "{folder}/no-model"], "no-model"),
    "a bare cuda without CUDA": (["predict", "x", "--device", "cuda"], "no CUDA device"),
    "a device map naming a GPU that is not here": (
        ["predict", "x", "--device-map", '{{"model.layers.0": "cuda:0"}}'],
        "model.layers.0",
    ),
    "a malformed device map": (["predict", "x", "--device-map", "{{nope"], "device map"),
    "export onto a non-empty folder": (
        ["export", "--edit", "{bad_json}", "--out", "{folder}"],
        "exists and is not empty",
    ),
    "export of a folder that is not an edit": (
        ["export", "--edit", "{folder}", "--out", "{folder}/new"],
        "is not a saved edit",
    ),
    "trace-dataset with a missing facts file": (
        ["trace-dataset", "--facts", "{file}.nope"],
        "does not exist",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_needs_no_model(case, files, no_model_load, capsys):
    argv, message = CASES[case]
    code = main([a.format(**files) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


#: Numbers out of range, refused while parsing (argparse: exit 2, the usage line, then one
#: error line naming the option).
NUMBERS = {
    "predict -k 0": (["predict", "x", "-k", "0"], "-k"),
    "a zero token budget": (["predict", "x", "--max-batch-tokens", "0"], "--max-batch-tokens"),
    "eval --n 0": (["eval", "--n", "0"], "--n/--n-cases"),
    "eval --n-cases -3": (["eval", "--n-cases", "-3"], "--n/--n-cases"),
    "eval --batch 0": (["eval", "--batch", "0"], "--batch"),
    "eval --seed -1": (["eval", "--seed", "-1"], "--seed"),
    "eval --gen-tokens -1": (["eval", "--gen-tokens", "-1"], "--gen-tokens"),
    "eval --checkpoint-every 0": (["eval", "--sequential", "--checkpoint-every", "0"], "--check"),
    "eval --ppl-tokens 0": (["eval", "--sequential", "--ppl-tokens", "0"], "--ppl-tokens"),
    "eval --scaling 1,0": (["eval", "--scaling", "1,0,10"], "--scaling"),
    "stats --tokens 0": (["stats", "--layers", "1", "--tokens", "0"], "--tokens"),
    "stats --seq-len 0": (["stats", "--layers", "1", "--seq-len", "0"], "--seq-len"),
    "stats --batch-size 0": (["stats", "--layers", "1", "--batch-size", "0"], "--batch-size"),
    "edit --epsilon 0": (
        ["edit", "--requests", "r.json", "--method", "ft-l", "--out", "x", "--epsilon", "0"],
        "--epsilon",
    ),
    "edit --fisher-weight -1": (
        ["edit", "--requests", "r.json", "--method", "mixed", "--out", "x"]
        + ["--fisher-weight", "-1"],
        "--fisher-weight",
    ),
    "layer-sweep --n 0": (["layer-sweep", "--out", "x", "--n", "0"], "--n/--n-cases"),
    "layer-sweep --samples 0": (["layer-sweep", "--out", "x", "--samples", "0"], "--samples"),
    "a count that is not a number": (["eval", "--n", "ten"], "--n/--n-cases"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_numbers_out_of_range_are_refused_while_parsing(case, no_model_load, capsys):
    argv, option = NUMBERS[case]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no usage text
    assert line.startswith(f"error: argument {option}") and "expected " in line, line


def test_unknown_model_lists_what_can_be_loaded(capsys):
    assert main(["predict", "x", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'") and err.count("\n") == 1
    assert "internet" not in err and "Available here:" in err


def test_a_bug_is_not_hidden_as_bad_input(monkeypatch):
    """Only factscope's own errors become one-line messages; anything else keeps its
    traceback (here: a KeyError raised by a broken command)."""
    import factscope.cli.models as cli_models

    def broken(_args):
        raise KeyError("x")

    monkeypatch.setattr(cli_models, "cmd_models", broken)
    with pytest.raises(KeyError):
        main(["models"])
