"""Edit requests: normalisation, JSON shapes, and every bad-input error naming the request."""

from __future__ import annotations

import json

import pytest

from editing.evaluation.datasets import load_counterfact
from editing.evaluation.tasks import Case, CounterFactTask
from editing.requests import EditRequest, load_requests, validate_requests
from tracing.errors import InvalidInput


def _req(**kw) -> EditRequest:
    base = dict(
        template="{} is located in the city of",
        subject="The Space Needle",
        target_new="Paris",
        target_true="Seattle",
    )
    return EditRequest(**{**base, **kw})


def test_targets_are_space_normalised_and_prompt_filled():
    r = _req(target_new="  Rome", target_true="Seattle")
    assert r.target_new == " Rome" and r.target_true == " Seattle"
    assert r.prompt == "The Space Needle is located in the city of"
    assert EditRequest.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="unknown EditRequest field"):
        EditRequest.from_dict({**r.to_dict(), "colour": "red"})


def test_subject_occurrence_finds_the_filled_slot():
    r = EditRequest("Paris is not {}, but {} is", "Paris", " x")  # two slots: invalid anyway
    assert r.problems()
    r = EditRequest("Paris fans say {} is the capital of", "Paris", " Italy")
    assert r.prompt == "Paris fans say Paris is the capital of"
    assert r.subject_occurrence == 1


def test_counterfact_request_keeps_both_targets():
    rec = load_counterfact(full_sample=True)[0]
    r = CounterFactTask().request(Case(rec.case_id, rec))
    assert r.prompt == rec.prompt and r.case_id == rec.case_id
    assert r.target_new.strip() == rec.target_new.strip()
    assert r.target_true.strip() == rec.target_true.strip()


def test_load_requests_all_shapes(tmp_path):
    items = [
        {
            "case_id": 7,
            "requested_rewrite": {
                "prompt": "{} plays the sport of",
                "subject": "Michael Jordan",
                "target_new": {"str": "soccer"},
                "target_true": {"str": "basketball"},
                "relation_id": "P641",
            },
        },
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {
            "prompt": "The capital of France is",
            "subject": "France",
            "target_new": " Lyon",
            "ground_truth": "Paris",
        },
        _req().to_dict(),
    ]
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(items))
    reqs = load_requests(path)
    assert [r.case_id for r in reqs] == [7, None, None, None]
    assert reqs[0].template == "{} plays the sport of" and reqs[0].target_new == " soccer"
    assert reqs[0].relation_id == "P641" and reqs[0].target_true == " basketball"
    assert reqs[2].template == "The capital of {} is" and reqs[2].target_true == " Paris"
    assert reqs[3] == _req()
    one = tmp_path / "one.json"
    one.write_text(json.dumps(items[1]))
    assert load_requests(one) == [reqs[1]]


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"prompt": "The capital of France is", "subject": "Spain", "target_new": "x"},
            r"request 1 \(subject 'Spain'\): subject 'Spain' is not in the prompt",
        ),
        (
            {"prompt": "The capital of france is", "subject": "France", "target_new": "x"},
            "different case or spacing",
        ),
        (
            {"prompt": "{} is", "subject": "France", "target_new": "   "},
            r"request 1 \(subject 'France'\): empty target_new",
        ),
        (
            {"prompt": "{} is", "subject": "France"},
            r"request 1: missing field\(s\) \['target_new'\]",
        ),
        ({"prompt": "{} and {} are", "subject": "France", "target_new": "x"}, "exactly one"),
        (
            {"case_id": 3, "prompt": "{} is", "subject": "", "target_new": "x"},
            "request 1 .*case_id 3.*empty subject",
        ),
    ],
)
def test_load_requests_errors_name_the_request(tmp_path, record, message):
    good = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(ValueError, match=message):
        load_requests(path)


def test_load_requests_missing_file_and_bad_json(tmp_path):
    with pytest.raises(InvalidInput):
        load_requests(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_requests(bad)


# --------------------------------------------------------------------------- with a model


def test_validate_accepts_a_good_batch(toy_model):
    validate_requests(toy_model, [_req(), _req(subject="The Eiffel Tower", target_new="Rome")])


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(template="The city of"), "subject is not in the template"),
        (dict(template="{} and {}"), "exactly one"),
        (dict(template="{x} is {}"), "braces other than"),
        (dict(target_new=""), "empty target_new"),
        (dict(target_new="   "), "empty target_new"),
        (dict(target_true=" "), "empty target_true"),
        (dict(subject="  "), "empty subject"),
    ],
)
def test_validate_errors_name_index_and_subject(toy_model, bad, message):
    reqs = [_req(subject="The Eiffel Tower", target_new="Rome"), _req(**bad)]
    with pytest.raises(ValueError, match=r"request 1 \(subject .*\).*" + f"({message})"):
        validate_requests(toy_model, reqs)


def test_validate_target_that_tokenises_to_nothing(toy_model, monkeypatch):
    tok = toy_model.tokenizer
    real_call = type(tok).__call__

    def call(self, text, *args, **kw):  # this tokenizer maps one target to no tokens
        if self is tok and isinstance(text, str) and text.strip() == "Nowhere":
            return {"input_ids": []}
        return real_call(self, text, *args, **kw)

    monkeypatch.setattr(type(tok), "__call__", call)
    with pytest.raises(
        ValueError,
        match=r"request 0 \(subject 'The Space Needle'.*target_new.*tokenises to nothing",
    ):
        validate_requests(toy_model, [_req(target_new="Nowhere")])
    with pytest.raises(ValueError, match=r"request 0 .*target_true.*tokenises to nothing"):
        validate_requests(toy_model, [_req(target_true="Nowhere")])


def test_validate_duplicates_and_conflicts(toy_model):
    a = _req(target_new="Paris", case_id=1)
    with pytest.raises(
        ValueError,
        match=r"request 1 \(subject 'The Space Needle'.*duplicates "
        r"request 0",
    ):
        validate_requests(toy_model, [a, _req(target_new=" Paris")])
    with pytest.raises(
        ValueError,
        match=r"request 2 .*conflicts with request 0.*' Paris'.*"
        r"' Rome'",
    ):
        validate_requests(toy_model, [a, _req(subject="The Eiffel Tower"), _req(target_new="Rome")])
    # same subject and relation with different targets conflicts even with another template
    r1 = _req(relation_id="P131")
    r2 = _req(template="{} can be found in", relation_id="P131", target_new="Berlin")
    with pytest.raises(ValueError, match="same subject and relation 'P131'"):
        validate_requests(toy_model, [r1, r2])
    validate_requests(toy_model, [r1, _req(template="{} can be found in", relation_id="P131")])


def test_validate_empty_batch_and_wrong_type(toy_model):
    with pytest.raises(ValueError, match="no edit requests"):
        validate_requests(toy_model, [])
    with pytest.raises(ValueError, match="request 0: expected an EditRequest"):
        validate_requests(toy_model, [{"subject": "x"}])
