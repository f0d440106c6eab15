"""Chat templates (tracing.chat): prompts wrapped in the tokenizer's chat template for
tracing, editing and evaluation, the subject found inside the wrapped text.

The tiny models' tokenizers get a small Jinja template with a system line that itself names
the subject (so the first occurrence of the subject in the wrapped text is the wrong one) and
a BOS written by the template. Expected values come from the tokenizer's own
``apply_chat_template`` and a Hugging Face forward pass, never from factscope's wrapping.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from editing.api import make_edit
from editing.evaluation import evaluate
from editing.hparams import TargetHparams
from editing.methods.rome import RomeHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.stats import layer_second_moments
from tracing.chat import chat_template_on, render_chat, use_chat_template
from tracing.errors import InvalidInput
from tracing.facts import tokenize_fact
from tracing.models import load_model, target_ids
from tracing.trace import trace_fact

SUBJECT = "The Space Needle"
PROMPT = "Of all towers, The Space Needle is in"
CHAT = (
    "{{ bos_token }}<|system|>\nYou know The Space Needle well.\n"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
REQ = EditRequest("{} is located in the city of", SUBJECT, "Paris")
TEMPLATES = ["{}", "Because of this. {}"]


@pytest.fixture(scope="module")
def chat_models(toy_dirs):
    """GPT-2 (no BOS rule) and Llama (BOS rule) of their own, with the chat template on."""
    out = {}
    for arch in ("gpt2", "llama"):
        model = load_model(toy_dirs[arch])
        model.tokenizer.chat_template = CHAT
        use_chat_template(model)
        out[arch] = model
    return out


def _expected_ids(model, content: str) -> list[int]:
    """The template rendered by the tokenizer itself and tokenised as written (its ``<bos>``
    text is the BOS token): what an instruct model is fed."""
    tok = model.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _plain_span(model, ids: list[int], subject: str) -> tuple[int, int]:
    """The shortest token run after the user's turn marker that decodes to ``subject``."""
    tok = model.tokenizer
    user = next(i for i in range(len(ids)) if tok.decode(ids[: i + 1]).endswith("<|user|>"))
    runs = [
        (i, j)
        for i in range(user + 1, len(ids))
        for j in range(i + 1, len(ids) + 1)
        if tok.decode(ids[i:j]).strip() == subject
    ]
    assert runs, "subject not found"
    return min(runs, key=lambda r: r[1] - r[0])


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model.original_model(torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_subject_span_is_found_in_the_wrapped_prompt(chat_models, arch):
    model = chat_models[arch]
    fact = tokenize_fact(model, PROMPT, SUBJECT)
    ids = _expected_ids(model, PROMPT)
    assert list(fact.ids) == ids
    assert ids.count(model.tokenizer.bos_token_id) == 1 and ids[0] == model.tokenizer.bos_token_id
    assert fact.subject_span == _plain_span(model, ids, SUBJECT)
    text, start = render_chat(model, PROMPT)
    assert text[start : start + len(PROMPT)] == PROMPT
    assert text.index(SUBJECT) < start  # the system line's subject comes first and is skipped


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_trace_runs_on_the_wrapped_prompt(chat_models, arch):
    model = chat_models[arch]
    result = trace_fact(model, PROMPT, SUBJECT, kinds=("resid",), samples=2, noise=0.5)
    ids = _expected_ids(model, PROMPT)
    assert result.token_ids == ids
    assert result.subject_span == _plain_span(model, ids, SUBJECT)
    p = math.exp(float(_hf_logprobs(model, ids)[-1, result.answer_id]))
    assert result.p_clean == pytest.approx(p, rel=1e-4)
    assert result.scores["resid"].shape == (len(ids), 4)


def test_rome_reaches_its_target_in_the_wrapped_prompt(chat_models, tmp_path):
    model = chat_models["llama"]
    prepared = prepare_requests(model, [REQ], TEMPLATES)[0]
    # context templates go inside the user's message (see tracing.chat)
    assert list(prepared.prompts[0].ids) == _expected_ids(model, REQ.prompt)
    assert list(prepared.prompts[1].ids) == _expected_ids(model, "Because of this. " + REQ.prompt)
    assert list(prepared.kl.ids) == _expected_ids(model, f"{SUBJECT} is a")
    stats = layer_second_moments(
        model, [1], n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )
    hp = RomeHparams(layer=1, target=TargetHparams(num_steps=25, lr=0.5))
    edit = make_edit(model, REQ, "rome", hp, stats=stats, context_templates=TEMPLATES)
    target = target_ids(model, " Paris")[0]
    ids = _expected_ids(model, REQ.prompt)
    before = float(_hf_logprobs(model, ids)[-1, target].exp())
    with edit.applied(model):
        after = _hf_logprobs(model, ids)[-1]
    # a tiny random model moves slowly (the full 25 steps: 1.7e-4 -> 6.8e-3 measured); the
    # edit optimised on the wrapped prompts raises the target there by well over 10x
    assert float(after[target].exp()) > 10 * before


def test_evaluation_scores_the_wrapped_prompts(chat_models, tmp_path, reduced_record):
    from editing.evaluation.datasets import load_counterfact

    model = chat_models["gpt2"]
    recs = [reduced_record(r) for r in load_counterfact()[:2]]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(recs))
    s = evaluate(
        model,
        dataset=path,
        method="none",
        n=2,
        out_dir=tmp_path / "out",
        only_known=False,
        generation=None,
        progress=False,
    )
    rows = [json.loads(x) for x in open(s.files["rows"])]
    assert len(rows) == 2
    for rec, row in zip(recs, rows, strict=True):
        ids = _expected_ids(model, rec["prompt"])
        tgt = target_ids(model, " " + rec["target_new"].strip())
        lp = _hf_logprobs(model, ids + tgt[:-1])
        mean = sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)
        key = next(k for k in row if k.endswith("rewrite_p_new"))
        assert row[key] == pytest.approx(math.exp(mean), rel=1e-4)


def test_a_tokenizer_without_a_template_is_refused(toy_models):
    model = toy_models["gpt2"]
    with pytest.raises(InvalidInput, match="^tokenizer of .* has no chat template$"):
        use_chat_template(model)
    assert not chat_template_on(model)
    use_chat_template(model, False)  # switching off never needs a template


@pytest.fixture(scope="module")
def chat_folder(toy_dirs, tmp_path_factory):
    """A copy of the tiny GPT-2's folder whose saved tokenizer carries the chat template."""
    folder = tmp_path_factory.mktemp("chat") / "gpt2-chat"
    shutil.copytree(toy_dirs["gpt2"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT
    tok.save_pretrained(folder)
    return str(folder)


def test_cli_trace_with_a_chat_template(chat_folder, tmp_path, capsys):
    from factscope.cli import main

    args = ["trace", PROMPT, "--subject", SUBJECT, "--model", chat_folder, "--chat-template"]
    args += ["--samples", "2", "--noise", "0.5", "--kinds", "resid", "--formats", "svg"]
    assert main([*args, "--out", str(tmp_path), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "trace.json").read_text())
    model = load_model(chat_folder)
    assert saved["token_ids"] == _expected_ids(model, PROMPT)


@pytest.mark.parametrize("command", ["trace", "edit", "eval"])
def test_cli_refuses_a_chat_template_the_tokenizer_lacks(toy_dirs, command, capsys, tmp_path):
    from factscope.cli import main

    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([REQ.to_dict()]))
    args = {
        "trace": ["trace", PROMPT, "--subject", SUBJECT, "--out", str(tmp_path)],
        "edit": ["edit", "--requests", str(requests), "--method", "rome", "--out", str(tmp_path)],
        "eval": ["eval", "--method", "none", "--n-cases", "1", "--out", str(tmp_path)],
    }[command]
    assert main([*args, "--model", toy_dirs["gpt2"], "--chat-template"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: tokenizer of ") and err[-1].endswith("has no chat template")
    assert not (tmp_path / "trace.json").exists()
