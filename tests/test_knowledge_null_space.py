"""AlphaEdit's knowledge-aware preserved set (``knowledge_share``, off by default): C_known
against a plain loop, the C_mix projector against an independent float64 eigh, the edit
unchanged while off, known keys protected while on, edited subjects left out, bad settings
refused before any work, and the projector cached once per setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import editing.statistics.known_keys as known_mod
from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods.alphaedit import AlphaEditHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.keys import subject_keys
from editing.statistics.known_keys import (
    fact_requests,
    knowledge_projectors,
    known_second_moment,
    preserved_facts,
)
from editing.statistics.stats import layer_second_moments
from tracing.errors import InvalidHparams, InvalidInput
from tracing.facts import Fact, load_known_facts
from tracing.models import down_proj

TEMPLATES = ["{}", "Because of this. {}"]
REQUESTS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]
LAYERS = [1, 2]
# answer None: counted as known whatever the tiny model predicts (tracing.facts.known_facts)
FACTS = [
    Fact("The Eiffel Tower is located in", "The Eiffel Tower"),
    Fact("Barack Obama was born in", "Barack Obama"),
    Fact("The capital of France is", "France"),
    Fact("Toyota was founded in", "Toyota"),
    Fact("Lionel Messi plays for", "Lionel Messi"),
    Fact("the space needle stands in", "the space needle "),  # an edited subject, other case
    Fact("The Danube flows through", "The Danube"),
    Fact("Mount Fuji is in", "Mount Fuji"),
]


def _hp(threshold: float, share: float | None = None, n_facts: int = 500) -> AlphaEditHparams:
    return AlphaEditHparams(
        layers=LAYERS,
        target=TargetHparams(num_steps=3, lr=0.5, clamp_norm_factor=0.5),
        nullspace_threshold=threshold,
        l2_weight=0.1,
        knowledge_share=share,
        knowledge_facts=n_facts,
    )


@pytest.fixture
def stats(toy_model, tmp_path):
    return layer_second_moments(
        toy_model, LAYERS, n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )


def _half(stats, layer: int) -> float:
    """A threshold leaving the smaller half of C_wiki's eigen-directions as the null space."""
    values = torch.linalg.eigvalsh(stats[layer].mom2.double())
    keep = len(values) // 2
    return float((values[keep - 1] + values[keep]) / 2)


def _edit_prepared(model):
    return prepare_requests(model, REQUESTS, TEMPLATES)


def test_known_second_moment_is_the_mean_outer_product(toy_model):
    L = 2
    used = [f for f in FACTS if "space needle" not in f.subject]
    prepared = fact_requests(toy_model, used, _edit_prepared(toy_model)[0])
    assert [t.template for t in prepared[0].prompts] == TEMPLATES
    got = known_second_moment(toy_model, prepared, L)
    keys = subject_keys(toy_model, prepared, L, weighting="group_mean").double()
    loop = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
    for k in keys:
        loop += torch.outer(k, k)
    loop /= len(used)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-12)


def test_mixed_projector_matches_an_independent_eigh(toy_model, stats):
    L, share = 2, 0.3
    threshold = _half(stats, L)
    edited = _edit_prepared(toy_model)
    found = knowledge_projectors(
        toy_model,
        [L],
        _hp(threshold, share),
        edited,
        share=share,
        n_facts=500,
        threshold=threshold,
        given=stats,
        facts=FACTS,
    )
    used = found.facts
    assert used is not None and len(used) == len(FACTS) - 1
    keys = (
        subject_keys(
            toy_model, fact_requests(toy_model, used, edited[0]), L, weighting="group_mean"
        )
        .double()
        .numpy()
    )
    c_known = sum(np.outer(k, k) for k in keys) / len(keys)
    c_mix = (1 - share) * stats[L].mom2.double().numpy() + share * c_known
    values, vectors = np.linalg.eigh(c_mix)
    small = vectors[:, values < threshold]
    expected = torch.from_numpy(small @ small.T)
    P = found.projectors[L]
    assert P.dtype == torch.float32
    torch.testing.assert_close(P.double(), expected, rtol=0, atol=1e-5)
    assert round(float(P.trace())) == small.shape[1]


def test_off_is_todays_alphaedit_bit_for_bit(toy_model, stats, monkeypatch):
    threshold = min(_half(stats, L) for L in LAYERS)
    common = dict(stats=stats, context_templates=TEMPLATES, progress=False)
    before = {L: down_proj(toy_model, L).detach().clone() for L in LAYERS}
    plain = make_edit(toy_model, REQUESTS, "alphaedit", _hp(threshold), **common)

    def refuse(*args, **kwargs):
        raise AssertionError("the knowledge-aware path ran while off")

    monkeypatch.setattr("editing.methods.alphaedit.knowledge_projectors", refuse)
    again = make_edit(toy_model, REQUESTS, "alphaedit", _hp(threshold, None), **common)
    for a, b in zip(plain.deltas, again.deltas, strict=True):
        assert torch.equal(a.matrix(), b.matrix())
    d = _hp(threshold).to_dict()
    assert "knowledge_share" not in d and "knowledge_facts" not in d
    assert plain.hparams == d and "knowledge_preservation" not in plain.metadata
    assert AlphaEditHparams.from_dict(d) == _hp(threshold)
    on = _hp(threshold, 0.5, 7).to_dict()
    assert (on["knowledge_share"], on["knowledge_facts"]) == (0.5, 7)
    for L in LAYERS:
        assert torch.equal(down_proj(toy_model, L), before[L])


def test_known_keys_move_far_less_with_the_option(toy_model, stats, monkeypatch):
    monkeypatch.setattr(known_mod, "load_known_facts", lambda: list(FACTS))
    threshold = min(_half(stats, L) for L in LAYERS)
    common = dict(stats=stats, context_templates=TEMPLATES, progress=False)
    off = make_edit(toy_model, REQUESTS, "alphaedit", _hp(threshold), **common)
    on = make_edit(toy_model, REQUESTS, "alphaedit", _hp(threshold, 0.5), **common)
    meta = on.metadata["knowledge_preservation"]
    assert meta == {"share": 0.5, "facts": len(FACTS) - 1, "excluded_subjects": 2, "cached": False}
    used = [f for f in FACTS if "space needle" not in f.subject]
    prepared = fact_requests(toy_model, used, _edit_prepared(toy_model)[0])
    for L in LAYERS:  # keys with the unedited weights, as the projector was built
        k = subject_keys(toy_model, prepared, L).double()
        moved_off = (k @ next(d for d in off.deltas if d.layer == L).matrix(torch.float64)).norm()
        moved_on = (k @ next(d for d in on.deltas if d.layer == L).matrix(torch.float64)).norm()
        assert moved_on < 0.2 * moved_off, (L, float(moved_on), float(moved_off))


def test_facts_about_an_edited_subject_are_left_out(toy_model, stats, monkeypatch):
    kept = preserved_facts(toy_model, 500, [" THE SPACE NEEDLE"], facts=FACTS)
    assert [f.subject for f in kept] == [f.subject for f in FACTS if "space" not in f.subject]
    assert [f.subject for f in preserved_facts(toy_model, 3, [], facts=FACTS)] == [
        f.subject for f in FACTS[:3]
    ]
    seen: list[list[Fact]] = []
    real = known_mod.fact_requests

    def spy(model, facts, like):
        seen.append(list(facts))
        return real(model, facts, like)

    monkeypatch.setattr(known_mod, "fact_requests", spy)
    monkeypatch.setattr(known_mod, "load_known_facts", lambda: list(FACTS))
    threshold = min(_half(stats, L) for L in LAYERS)
    make_edit(
        toy_model,
        REQUESTS,
        "alphaedit",
        _hp(threshold, 0.5),
        stats=stats,
        context_templates=TEMPLATES,
        progress=False,
    )
    assert seen and all("space needle" not in f.subject.lower() for f in seen[0])
    assert len(seen[0]) == len(FACTS) - 1
    # nothing left once every fact's subject is edited: refused, weights unchanged
    only = [FACTS[5]]
    monkeypatch.setattr(known_mod, "load_known_facts", lambda: only)
    before = {L: down_proj(toy_model, L).detach().clone() for L in LAYERS}
    with pytest.raises(InvalidInput, match="knowledge-aware preservation needs known facts"):
        make_edit(
            toy_model,
            REQUESTS,
            "alphaedit",
            _hp(threshold, 0.5),
            stats=stats,
            context_templates=TEMPLATES,
            progress=False,
        )
    for L in LAYERS:
        assert torch.equal(down_proj(toy_model, L), before[L])


def test_bad_settings_are_refused_in_one_line_before_any_work(toy_models, monkeypatch):
    model = toy_models["gpt2"]

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr("editing.methods.alphaedit.knowledge_projectors", refuse)
    monkeypatch.setattr("editing.methods.alphaedit.layer_projectors", refuse)
    before = {L: down_proj(model, L).detach().clone() for L in LAYERS}
    base = {"layers": LAYERS, "nullspace_threshold": 0.02}
    for bad in (0, 0.0, 1, 1.0, 1.5, -0.1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(InvalidHparams, match="knowledge_share") as exc:
            make_edit(model, REQUESTS, "alphaedit", {**base, "knowledge_share": bad})
        assert "\n" not in str(exc.value)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(InvalidHparams, match="knowledge_facts") as exc:
            AlphaEditHparams(layers=LAYERS, knowledge_share=0.5, knowledge_facts=bad)
        assert "\n" not in str(exc.value)
    for L in LAYERS:
        assert torch.equal(down_proj(model, L), before[L])


def test_the_mixed_projector_is_cached_per_setting(toy_models, tmp_path, monkeypatch):
    model = toy_models["gpt2"]
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    hp = _hp(0.02, 0.5)
    hp.mom2_n_tokens = 1000
    edited = _edit_prepared(model)
    args = dict(n_facts=500, threshold=0.02, facts=FACTS)
    first = knowledge_projectors(model, [1], hp, edited, share=0.5, **args)
    assert first.facts is not None
    assert len(list(tmp_path.rglob("layer_1.nullspace-0.02-known-*.safetensors"))) == 1

    def refuse(*a, **k):
        raise AssertionError("recomputed a cached knowledge-aware projector")

    monkeypatch.setattr(known_mod, "subject_keys", refuse)
    monkeypatch.setattr(known_mod, "null_space_projector", refuse)
    again = knowledge_projectors(model, [1], hp, edited, share=0.5, **args)
    assert again.facts is None and torch.equal(first.projectors[1], again.projectors[1])
    monkeypatch.undo()
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    knowledge_projectors(model, [1], hp, edited, share=0.25, **args)
    knowledge_projectors(model, [1], hp, edited[:1], share=0.5, **args)  # other exclusions
    knowledge_projectors(model, [1], hp, edited, share=0.5, **{**args, "n_facts": 3})
    assert len(list(tmp_path.rglob("layer_1.nullspace-0.02-known-*.safetensors"))) == 4


def test_a_batch_and_a_stream_leave_out_their_subjects(
    toy_models, tmp_path, monkeypatch, reduced_record
):
    """``exclude_subjects`` widens the exclusion beyond the batch; the sequential runner
    passes every subject of its stream to every batch (so the setting, and the cached
    projector, is the same for the whole stream)."""
    import json

    import editing.evaluation.sequential as seq_mod
    from editing.evaluation import evaluate_sequential
    from editing.evaluation.datasets import load_counterfact

    model = toy_models["gpt2"]
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(known_mod, "load_known_facts", lambda: list(FACTS))
    hp = _hp(0.05, 0.5)
    hp.mom2_n_tokens = 2000
    one = make_edit(
        model,
        REQUESTS,
        "alphaedit",
        hp,
        context_templates=TEMPLATES,
        progress=False,
        exclude_subjects=["barack obama", "Someone Else"],
    )
    meta = one.metadata["knowledge_preservation"]
    assert (meta["facts"], meta["excluded_subjects"]) == (len(FACTS) - 2, 4)

    records = load_counterfact()[:4]
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([reduced_record(r) for r in records]))
    file = tmp_path / "alphaedit.json"
    file.write_text(
        json.dumps(
            {
                "layers": [0, 1],
                "target": {"num_steps": 2, "lr": 0.5},
                "mom2_n_tokens": 2000,
                "nullspace_threshold": 0.05,
                "l2_weight": 1.0,
                "context_templates": [[5, 2]],
                "knowledge_share": 0.5,
                "knowledge_facts": 5,
            }
        )
    )
    seen: list[tuple[list[str], list[str]]] = []
    real = seq_mod.make_edit

    def spy(model, requests, *args, **kwargs):
        seen.append(([r.subject for r in requests], list(kwargs.get("exclude_subjects", []))))
        return real(model, requests, *args, **kwargs)

    monkeypatch.setattr(seq_mod, "make_edit", spy)
    facts = tmp_path / "facts.json"
    shipped = load_known_facts()[:8]  # for the runner's own known-fact accuracy
    facts.write_text(
        json.dumps(
            [{"prompt": f.prompt, "subject": f.subject, "attribute": f.answer} for f in shipped]
        )
    )
    evaluate_sequential(
        model,
        dataset=cases,
        method="alphaedit",
        n=4,
        batch=2,
        checkpoint_every=2,
        hparams=file,
        out_dir=tmp_path / "out",
        name="run",
        only_known=False,
        split="all",
        ppl_tokens=256,
        progress=False,
        facts=facts,
    )
    subjects = [r.subject for r in records]
    assert len(seen) == 2
    for batch, excluded in seen:
        assert set(batch) <= set(subjects) and excluded == subjects
    from editing.edits.edit import Edit

    batches = sorted((tmp_path / "out" / "run" / "batches").iterdir())
    flags = [Edit.load(b).metadata["knowledge_preservation"]["cached"] for b in batches]
    assert flags == [False, True]  # one setting for the stream: computed once, then read
