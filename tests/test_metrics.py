"""Evaluation metrics: arithmetic on hand-set probabilities, the batched model scorer against a
plain full-logit computation, n-gram entropy by hand, seeded batched generation."""

from __future__ import annotations

import math

import pytest
import torch

from editing.evaluation.datasets import CounterFactRecord, ZsreRecord, load_counterfact
from editing.evaluation.generation import (
    GenerationSettings,
    fluency,
    generate_texts,
    generation_prompts,
    ngram_entropy,
    words,
)
from editing.evaluation.metrics import (
    ModelScorer,
    TokenScores,
    aggregate,
    counterfact_metrics,
    harmonic_mean,
    score_counterfact,
    score_zsre,
    zsre_metrics,
)
from tracing.models import target_ids, tokenize


def ts(logprobs, target=None, argmax=None) -> TokenScores:
    """Hand-made scores: target ids default to 1..k, argmax to the target (all correct)."""
    target = tuple(target or range(1, len(logprobs) + 1))
    return TokenScores(target, tuple(float(x) for x in logprobs), tuple(argmax or target))


class StubScorer:
    """A probability source whose scores are set by hand per (prompt, target)."""

    def __init__(self, table: dict[tuple[str, str], TokenScores]) -> None:
        self.table = table
        self.calls: list[list[tuple[str, str]]] = []

    def score(self, pairs):
        self.calls.append(list(pairs))
        return [self.table[p] for p in pairs]


RECORD = CounterFactRecord(
    case_id=7,
    subject="Xavi",
    template="{} plays for",
    target_true="Barcelona",
    target_new="Milan",
    paraphrase_prompts=("P1", "P2"),
    neighborhood_prompts=("N1", "N2", "N3"),
)


def _table(post: bool) -> dict:
    """Probabilities of the stub case before (post=False) or after an edit."""
    t = {
        # edit prompt: before, true wins; after, new wins
        ("Xavi plays for", " Milan"): ts([-1.0, -3.0] if post else [-4.0, -6.0]),
        ("Xavi plays for", " Barcelona"): ts([-2.5] if post else [-0.5]),
        # paraphrases: P1 flips, P2 does not
        ("P1", " Milan"): ts([-0.1], argmax=(1,)),
        ("P1", " Barcelona"): ts([-2.0]),
        ("P2", " Milan"): ts([-3.0], argmax=(9,)),
        ("P2", " Barcelona"): ts([-1.0]),
        # neighbours: N1 and N2 keep the true target ahead, N3 is damaged after the edit
        ("N1", " Milan"): ts([-5.0]),
        ("N1", " Barcelona"): ts([-1.0, -1.0], target=(4, 5), argmax=(4, 5)),
        ("N2", " Milan"): ts([-5.0]),
        ("N2", " Barcelona"): ts([-1.0, -1.0], target=(4, 5), argmax=(4, 5)),
        ("N3", " Milan"): ts([-0.2] if post else [-5.0]),
        ("N3", " Barcelona"): ts([-3.0, -1.0], target=(4, 5), argmax=(7, 5) if post else (4, 5)),
    }
    return t


def test_counterfact_metrics_on_hand_set_probabilities():
    pre, post = (score_counterfact(StubScorer(_table(p)), [RECORD])[0] for p in (False, True))
    m = counterfact_metrics(post, pre)
    e = math.exp
    assert m["efficacy_success"] == 1.0
    assert m["efficacy_magnitude"] == pytest.approx(e(-2.0) - e(-2.5))
    assert m["paraphrase_success"] == 0.5
    assert m["paraphrase_magnitude"] == pytest.approx(((e(-0.1) - e(-2)) + (e(-3) - e(-1))) / 2)
    assert m["neighborhood_success"] == pytest.approx(2 / 3)
    assert m["neighborhood_magnitude"] == pytest.approx(
        ((e(-1) - e(-5)) * 2 + (e(-2) - e(-0.2))) / 3
    )
    assert m["rewrite_p_new"] == pytest.approx(e(-2.0))
    assert m["neighborhood_p_true"] == pytest.approx((e(-1) * 2 + e(-2)) / 3)
    # EasyEdit: all edit-prompt tokens right; P1 right, P2 wrong; N3 lost 1 of 2 argmaxes
    assert m["rewrite_acc"] == 1.0
    assert m["rephrase_acc"] == 0.5
    # strict (greedy continuation is the whole new target): the same here, per prompt
    assert m["strict_efficacy"] == 1.0 and m["strict_paraphrase"] == 0.5
    assert m["locality"] == pytest.approx((1 + 1 + 0.5) / 3)
    # bleed onto the neighbours: only N3's P(new) moved (-5 -> -0.2)
    assert m["neighborhood_new_gain"] == pytest.approx((e(-0.2) - e(-5)) / 3)
    assert m["neighborhood_new_gain_max"] == pytest.approx(e(-0.2) - e(-5))
    before = counterfact_metrics(pre, pre)
    assert before["efficacy_success"] == 0.0 and before["locality"] == 1.0
    assert before["neighborhood_new_gain"] == before["neighborhood_new_gain_max"] == 0.0
    assert counterfact_metrics(post)["locality"] is None
    assert counterfact_metrics(post)["neighborhood_new_gain"] is None


def test_scorer_gets_every_pair_in_one_call_and_success_is_strict():
    stub = StubScorer(_table(True))
    score_counterfact(stub, [RECORD, RECORD])
    assert len(stub.calls) == 1 and len(stub.calls[0]) == 2 * 12
    tie = dict(_table(True))
    tie[("Xavi plays for", " Milan")] = ts([-2.5])  # equal to the true target: not a success
    m = counterfact_metrics(score_counterfact(StubScorer(tie), [RECORD])[0])
    assert m["efficacy_success"] == 0.0 and m["efficacy_magnitude"] == 0.0


def test_record_without_paraphrases_gives_none_not_zero():
    rec = CounterFactRecord(
        case_id=1,
        subject="Xavi",
        template="{} plays for",
        target_true="Barcelona",
        target_new="Milan",
    )
    m = counterfact_metrics(score_counterfact(StubScorer(_table(True)), [rec])[0])
    assert m["paraphrase_success"] is None and m["neighborhood_success"] is None
    agg = aggregate([m, {**m, "paraphrase_success": 1.0}])
    assert agg["paraphrase_success"] == 1.0  # missing values skipped, not counted as 0


def test_harmonic_mean_and_aggregate_score():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert harmonic_mean([1.0, None]) is None
    rows = [
        {"efficacy_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": 0.0},
        {"efficacy_success": 1.0, "paraphrase_success": 0.0, "neighborhood_success": 1.0},
    ]
    agg = aggregate(rows)
    assert agg["paraphrase_success"] == 0.5
    assert agg["score"] == pytest.approx(3 / (1 + 2 + 2))  # harmonic mean of 1, .5, .5


def test_zsre_token_accuracy():
    rec = ZsreRecord(
        subject="Watts",
        question="Where did Watts study?",
        target_new="MIT",
        answers=("Illinois",),
        rephrase="Watts studied where?",
        loc_question="nq question: who wrote hamlet",
        loc_answer="Shakespeare",
    )
    table = {
        ("Where did Watts study?", " MIT"): ts([-1, -1, -1], target=(1, 2, 3), argmax=(1, 2, 9)),
        ("Watts studied where?", " MIT"): ts([-1, -1, -1], target=(1, 2, 3), argmax=(0, 0, 3)),
        ("nq question: who wrote hamlet?", " Shakespeare"): ts([-1, -1], target=(5, 6)),
    }
    m = zsre_metrics(score_zsre(StubScorer(table), [rec])[0])
    # strict: greedy decoding must give all three tokens; 2 of 3 right is a failure
    assert m == pytest.approx(
        {
            "efficacy_acc": 2 / 3,
            "paraphrase_acc": 1 / 3,
            "specificity_acc": 1.0,
            "strict_efficacy": 0.0,
            "strict_paraphrase": 0.0,
        }
    )
    table[("Where did Watts study?", " MIT")] = ts([-1] * 3, target=(1, 2, 3), argmax=(1, 2, 3))
    assert zsre_metrics(score_zsre(StubScorer(table), [rec])[0])["strict_efficacy"] == 1.0


def test_ngram_entropy_by_hand():
    # "a b a b a b": bigrams ab x3, ba x2 -> H2 = H(.6, .4); trigrams aba x2, bab x2 -> H3 = 1
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b a b") == pytest.approx(expected)
    repeated = "the cat sat. " * 10
    varied = "the cat sat on a mat while my dog ran over green hills toward an old red barn."
    assert ngram_entropy(repeated) < ngram_entropy(varied)
    assert ngram_entropy("") == 0.0
    assert words("Paris, France!") == ["Paris", ",", "France", "!"]
    assert fluency(["a b a b a b", ""]) == pytest.approx(expected / 2)
    assert fluency([]) is None


# --------------------------------------------------------------------------- real (tiny) models

PAIRS = [
    ("The Eiffel Tower is located in", " Paris"),
    ("Danielle Darrieux's mother tongue is", " French"),
    ("The Space Needle is in the city of", " Seattle, Washington"),
    ("Paris is", " a city"),
    ("Paris is", " a city"),  # duplicate: scored once, returned twice
    ("Paris is", " a"),  # read from the pass of " a city"
    ("The Eiffel Tower is located in", " Rome"),  # shares the pass of " Paris"
]


def _reference(model, prompt: str, target: str) -> tuple[list[float], list[int]]:
    """One sequence, full logits at every position, float64 log-softmax."""
    p, t = tokenize(model, prompt), target_ids(model, target)
    with torch.no_grad():
        logits = model(torch.tensor([p + t]), use_cache=False)[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    rows = range(len(p) - 1, len(p) + len(t) - 1)
    return [float(logp[r, tok]) for r, tok in zip(rows, t, strict=True)], [
        int(logp[r].argmax()) for r in rows
    ]


def test_batched_scorer_equals_one_by_one_and_full_logits(toy_model):
    batched = ModelScorer(toy_model, batch_size=8).score(PAIRS)
    single = [ModelScorer(toy_model, batch_size=1).score([pair])[0] for pair in PAIRS]
    for b, s, (prompt, target) in zip(batched, single, PAIRS, strict=True):
        lp, am = _reference(toy_model, prompt, target)
        assert b.target == s.target == tuple(target_ids(toy_model, target))
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-5)
        assert b.logprobs == pytest.approx(lp, abs=1e-4)
        assert list(b.argmax) == am


def test_scorer_shares_passes_between_targets_of_one_prompt(toy_models):
    """The pass of ``prompt + target[:-1]`` serves every target whose fed sequence is a
    prefix of it: fails if the sharing silently stops."""
    model = toy_models["gpt2"]
    scorer = ModelScorer(model)
    prompts = ["The Eiffel Tower is located in", "Paris is"]
    firsts = [target_ids(model, t)[0] for t in (" Paris", " Rome", " London")]
    pairs = [(p, model.tokenizer.decode([tok])) for p in prompts for tok in firsts]
    got = scorer.score(pairs)
    assert scorer.sequences_run == len(prompts)  # one pass per prompt, not per pair
    for g, (prompt, target) in zip(got, pairs, strict=True):
        lp, am = _reference(model, prompt, target)
        assert g.logprobs == pytest.approx(lp, abs=1e-4)
        assert list(g.argmax) == am


def test_generation_batched_equals_one_by_one_and_is_seeded(toy_models):
    model = toy_models["gemma3"]
    prompts = ["The Eiffel Tower is", "Paris is", "The mother tongue of Danielle Darrieux is"]
    for sample in (False, True):
        cfg = GenerationSettings(max_new_tokens=8, sample=sample)
        together = generate_texts(model, prompts, cfg, seeds=[3, 4, 5])
        alone = [
            generate_texts(model, [p], cfg, seeds=[s])[0]
            for p, s in zip(prompts, [3, 4, 5], strict=True)
        ]
        assert together == alone
        assert all(
            t.startswith(p) and len(t) > len(p) for t, p in zip(together, prompts, strict=True)
        )
    cfg = GenerationSettings(max_new_tokens=8)
    state = torch.random.get_rng_state()
    assert generate_texts(model, prompts, cfg, seeds=1) == generate_texts(
        model, prompts, cfg, seeds=1
    )
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_greedy_generation_matches_hf_generate(toy_models):
    model = toy_models["gpt2"]
    prompt = "The Space Needle is located in"
    ids = torch.tensor([tokenize(model, prompt)])
    with torch.no_grad():
        ref = model.original_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = prompt + model.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    got = generate_texts(model, [prompt], GenerationSettings(max_new_tokens=6, sample=False))
    assert got == [want]


def test_generation_prompt_source():
    full = load_counterfact(full_sample=True)[0]
    reduced = load_counterfact()[0]
    assert generation_prompts(full) == (list(full.generation_prompts), "record")
    prompts, source = generation_prompts(reduced)
    assert source == "subject" and all(reduced.subject in p for p in prompts)


# The anchors' ten CounterFact cases the embedded model knows.
ANCHOR_CASES = (0, 1, 4, 5, 6, 7, 13, 14, 16, 21)


@pytest.mark.model
def test_unedited_embedded_model_scores_near_zero_efficacy(gemma):
    records = [r for r in load_counterfact()[:22] if r.case_id in ANCHOR_CASES]
    rows = [counterfact_metrics(s) for s in score_counterfact(ModelScorer(gemma), records)]
    agg = aggregate(rows)
    assert agg["efficacy_success"] <= 0.1
    assert agg["rewrite_acc"] <= 0.1


def test_perplexity_equals_the_full_forward(toy_model):
    """perplexity() (the pass stopped after the last block, the vocabulary read 256 positions
    at a time) against exp of the mean next-token NLL of full float64 logits."""
    from editing.evaluation.ability import perplexity

    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(5, toy_model.cfg.d_vocab, (5, 70), generator=g).tolist()
    with torch.no_grad():
        logits = toy_model(torch.tensor(seqs), use_cache=False).double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(2, torch.tensor(seqs)[:, 1:, None]).mean()
    assert perplexity(toy_model, seqs, batch_size=4) == pytest.approx(float(nll.exp()), rel=1e-5)
