"""What a trace measures: symmetric token replacement, the noising direction, the logprob and
logit-diff metrics and the normalised effect, each against a plain loop on a tiny model;
the settings recorded, round-tripped and refused on resume; and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracing.corruption import choose_replacement
from tracing.errors import InvalidInput
from tracing.facts import load_known_facts, tokenize_fact
from tracing.localization import average_effects, select_layers, trace_dataset
from tracing.models import hook_name, n_layers, target_ids
from tracing.noise import noise_draws, resolve_noise
from tracing.results import TraceResult
from tracing.trace import trace_fact

PROMPT = "The Space Needle is in"
SUBJECT = "The Space Needle"


def states(model, ids, names, hooks=()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One run of ``ids`` with ``hooks``: the states at ``names`` and last-position logits."""
    store: dict[str, torch.Tensor] = {}

    def saver(name):
        def save(x, hook):
            store[name] = x.detach().clone()
            return x

        return save

    with torch.no_grad():
        logits = model.run_with_hooks(
            ids, fwd_hooks=[*hooks, *((nm, saver(nm)) for nm in names)], use_cache=False
        )
    return store, logits[:, -1].double()


def put(src, t):
    def hook(x, hook):
        x = x.clone()
        x[:, t] = src[:, t]
        return x

    return hook


def metric(logits, metric_name, answer, competitor=None):
    """Per-row metric in float64 from last-position logits."""
    if metric_name == "prob":
        return torch.softmax(logits, -1)[:, answer]
    if metric_name == "logprob":
        return torch.log_softmax(logits, -1)[:, answer]
    return logits[:, answer] - logits[:, competitor]


def plain_trace(model, clean_ids, corrupt_ids, embed_hooks, direction, metric_name, answer, comp):
    """The definition, cell by cell: the hidden state at (t, L) of the source run put into
    the base run (denoise: clean into corrupted; noise: each corrupted row into the clean
    run), the metric averaged over rows."""
    n = n_layers(model)
    names = [hook_name(model, "resid", layer) for layer in range(n)]
    clean, _ = states(model, clean_ids, names)
    corrupt, _ = states(model, corrupt_ids, names, embed_hooks)
    rows = corrupt_ids.shape[0]
    T = clean_ids.shape[1]
    out = np.zeros((T, n))
    for t in range(T):
        for L, name in enumerate(names):
            if direction == "denoise":
                src, ids, hooks = clean[name].expand(rows, -1, -1), corrupt_ids, embed_hooks
            else:
                src, ids, hooks = corrupt[name], clean_ids.expand(rows, -1), []
            _, logits = states(model, ids, [], [*hooks, (name, put(src, t))])
            out[t, L] = metric(logits, metric_name, answer, comp).mean().item()
    return out


def noise_hooks(model, span, samples, level, seed=1):
    b, e = span
    z = noise_draws(samples, e - b, int(model.cfg.d_model), resolve_noise(model, level), seed)

    def hook(x, hook):
        x = x.clone()
        x[:, b:e] = (x[:, b:e].double() + z).to(x.dtype)
        return x

    return [(hook_name(model, "embed"), hook)]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric_name", ["prob", "logprob", "logit-diff"])
def test_noise_traces_equal_the_plain_definition(toy_models, direction, metric_name):
    model = toy_models["gpt2"]  # its corrupted runs' top token is not the answer
    r = trace_fact(model, PROMPT, SUBJECT, kinds=("resid",), samples=3, noise=0.5,
                   direction=direction, metric=metric_name)  # fmt: skip
    ids = torch.tensor([r.token_ids])
    hooks = noise_hooks(model, r.subject_span, 3, 0.5)
    if metric_name == "logit-diff":  # the competitor: the corrupted runs' top token
        _, logits = states(model, ids.repeat(3, 1), [], hooks)
        assert r.competitor_id == int(torch.softmax(logits, -1).mean(0).argmax())
        assert r.competitor_id != r.answer_id
    want = plain_trace(model, ids, ids.repeat(3, 1), hooks, direction, metric_name,
                       r.answer_id, r.competitor_id)  # fmt: skip
    assert np.abs(r.scores["resid"] - want).max() < 2e-5
    _, clean_logits = states(model, ids, [])
    clean = metric(clean_logits, metric_name, r.answer_id, r.competitor_id).item()
    assert r.clean_score == pytest.approx(clean, abs=2e-5)
    assert r.settings.direction == direction and r.settings.metric == metric_name
    ref = trace_fact(model, PROMPT, SUBJECT, kinds=("resid",), samples=3, noise=0.5,
                     direction=direction, metric=metric_name, method="reference")  # fmt: skip
    assert np.abs(r.scores["resid"] - ref.scores["resid"]).max() < 2e-5


def test_normalised_effect_is_zero_at_the_corrupted_run_and_one_at_the_clean(toy_models):
    model = toy_models["gpt2"]
    raw = trace_fact(model, PROMPT, SUBJECT, kinds=("resid",), samples=2, noise=0.5,
                     metric="logit-diff")  # fmt: skip
    norm = trace_fact(model, PROMPT, SUBJECT, kinds=("resid",), samples=2, noise=0.5,
                      metric="logit-diff", normalise=True)  # fmt: skip
    lo, hi = raw.corrupted_score, raw.clean_score
    assert np.allclose(norm.scores["resid"], (raw.scores["resid"] - lo) / (hi - lo), atol=1e-12)
    assert norm.corrupted_score == 0 and norm.clean_score == 1
    start = raw.subject_span[0]
    assert np.allclose(norm.scores["resid"][:start], 0.0, atol=1e-6)  # before the subject
    # restoring the last token's final state gives back the clean run's value
    assert norm.scores["resid"][-1, -1] == pytest.approx(1.0, abs=1e-4)


def test_token_replacement_equals_the_plain_definition(toy_models):
    model = toy_models["gpt2"]
    for direction in ("denoise", "noise"):
        r = trace_fact(model, PROMPT, SUBJECT, kinds=("resid", "mlp"), corruption="replace",
                       direction=direction, metric="logit-diff", samples=5)  # fmt: skip
        assert r.settings.corruption == "replace" and r.settings.samples == 1
        rep = r.settings.replacement
        assert rep and rep != SUBJECT
        fact = tokenize_fact(model, PROMPT.replace(SUBJECT, rep), rep)
        assert len(fact.ids) == len(r.token_ids) and fact.subject_span == r.subject_span
        known = {f.subject: f for f in load_known_facts()}
        assert r.competitor_id == target_ids(model, known[rep].answer)[0] != r.answer_id
        clean, corrupt = torch.tensor([r.token_ids]), torch.tensor([fact.ids])
        want = plain_trace(model, clean, corrupt, [], direction, "logit-diff", r.answer_id,
                           r.competitor_id)  # fmt: skip
        assert np.abs(r.scores["resid"] - want).max() < 2e-5
        ref = trace_fact(model, PROMPT, SUBJECT, kinds=("resid", "mlp"), corruption="replace",
                         direction=direction, metric="logit-diff", method="reference")  # fmt: skip
        for k in ("resid", "mlp"):
            assert np.abs(r.scores[k] - ref.scores[k]).max() < 2e-5


def test_the_default_replacement_is_a_known_subject_of_the_relation_drawn_by_seed(toy_models):
    model = toy_models["gpt2"]
    facts = load_known_facts()
    for fact in facts[:60]:  # the first whose subject length other subjects of it share
        tok = tokenize_fact(model, fact.prompt, fact.subject)
        answer = target_ids(model, fact.answer)[0]
        try:
            choose_replacement(model, tok, fact.prompt, fact.subject, answer, 0)
            break
        except InvalidInput:
            continue
    picks = {choose_replacement(model, tok, fact.prompt, fact.subject, answer, s).subject
             for s in range(6)}  # fmt: skip
    assert len(picks) > 1  # the seed draws
    again = choose_replacement(model, tok, fact.prompt, fact.subject, answer, 3)
    assert again == choose_replacement(model, tok, fact.prompt, fact.subject, answer, 3)
    relation = {f.subject: f.relation_id for f in facts}
    width = tok.subject_span[1] - tok.subject_span[0]
    for subject in picks:
        assert relation[subject] == fact.relation_id and subject != fact.subject
        other = tokenize_fact(model, fact.prompt.replace(fact.subject, subject), subject)
        assert other.subject_span[1] - other.subject_span[0] == width


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(corruption="replace", replacement=SUBJECT), "is the subject itself"),
        (dict(corruption="replace", replacement="X"), "same length"),
        (dict(replacement="The Eiffel"), "needs corruption 'replace'"),
        (dict(metric="logit-diff", noise=0.0), "no competitor"),
        (dict(metric="kl"), "unknown metric"),
        (dict(direction="sideways"), "unknown direction"),
        (dict(corruption="swap"), "unknown corruption"),
        (dict(method="atp", metric="logprob"), "AtP estimates"),
    ],
)
def test_bad_measure_options_are_refused(toy_models, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, kinds=("resid",), samples=2, **kwargs)


def test_no_same_length_replacement_names_the_lengths_there_are(toy_models):
    subject = "Zqx Vwy Jkp Qzz Vvx Wqj Xkk Zzy Qqv"  # no known subject is this long
    prompt = f"{subject} is in"
    with pytest.raises(InvalidInput, match=r"lengths here: \["):
        trace_fact(toy_models["gpt2"], prompt, subject, kinds=("resid",), corruption="replace")


def test_settings_round_trip_and_a_resume_with_other_settings_is_refused(toy_models, tmp_path):
    model = toy_models["gpt2"]
    r = trace_fact(model, PROMPT, SUBJECT, kinds=("resid",), samples=2, noise=0.5,
                   metric="logprob", normalise=True)  # fmt: skip
    back = TraceResult.load(r.save(tmp_path / "t.json"))
    assert back.settings == r.settings and back.competitor == r.competitor
    assert back.clean_score == r.clean_score and np.array_equal(
        back.scores["resid"], r.scores["resid"]
    )
    facts = [f for f in load_known_facts()[:2]]
    opts = dict(kinds=("resid", "resid/mlp-severed"), samples=2, noise=0.5, only_known=False,
                progress=False, method="fast")  # fmt: skip
    done = trace_dataset(model, facts, out_dir=tmp_path / "run", **opts)
    eff = average_effects(done)
    assert "resid/mlp-severed" in eff.effects and eff.settings["metric"] == "prob"
    sel = select_layers(eff, k=2, by="mediation")
    per = eff.effects["resid"]["last_subject"] - eff.effects["resid/mlp-severed"]["last_subject"]
    assert sel.by == "mediation" and np.allclose(sel.per_layer_effect, per)
    best = max(range(len(per) - 1), key=lambda i: per[i] + per[i + 1])
    assert sel.layers == [best, best + 1]
    with pytest.raises(InvalidInput, match="metric 'prob'"):
        trace_dataset(model, facts, out_dir=tmp_path / "run", metric="logprob", **opts)
    with pytest.raises(InvalidInput, match="n must be"):
        trace_dataset(model, facts, n=0, **opts)
