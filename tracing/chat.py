"""Chat templates: tracing, editing and evaluating an instruction-tuned model on prompts in
the form it was trained on.

An instruct model sees a fact as a user message followed by the start of its own turn, not
as raw text. With the chat template on (:func:`use_chat_template`, the CLI's
``--chat-template``; off by default, as in the papers, which edit base models), every factual
prompt is wrapped in the tokenizer's chat template before it is tokenised::

    tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=False)

and the answer or target continues after the generation prompt (the model's reply). The
subject's tokens are found in the wrapped text: :func:`wrap_prompt` returns where the prompt
starts inside it, so a character span of the subject in the prompt maps to the same
characters of the wrapped text (:func:`tracing.facts.tokenize_fact` does this).

Where it applies (everything that tokenises a factual prompt): the traced fact and its
subject span, an edit's prepared prompts (the bare prompt, every context-template prompt,
the KL prompt ``"{subject} is a"``, neighbour prompts), fine-tuning's training prompts, and
the evaluation's scored and generated prompts. Not wrapped: text that is not a prompt (the
statistics' WikiText, the language-modelling and perplexity texts, the prefixes generated
for context templates).

Context templates (ROME's and MEMIT's random prefixes) go *inside* the user message: the
prompt ``"Because of this. The Space Needle is in"`` is wrapped as one message. The prefixes
exist to make the key and the target hold in varied contexts that precede the subject; in a
chat that context is earlier text of the same message, while text before the template's
own start-of-turn markers is never seen by an instruct model. The bare prompt (template
``"{}"``) is then exactly what the evaluation scores.

The setting belongs to the model object (like :func:`tracing.memory.set_batch_tokens`): set
it once after loading, and every prompt built for that model follows it.
"""

from __future__ import annotations

from tracing.errors import InvalidInput
from tracing.models import HookedModel, model_name, prepends_bos

_CHAT_ATTR = "factscope_chat_template"


def has_chat_template(tokenizer: object) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(model: HookedModel) -> None:
    """Raise a one-line :class:`~tracing.errors.InvalidInput` when ``model``'s tokenizer has
    no chat template (checked before anything runs)."""
    if not has_chat_template(model.tokenizer):
        raise InvalidInput(f"tokenizer of {model_name(model)} has no chat template")


def use_chat_template(model: HookedModel, enabled: bool = True) -> None:
    """Wrap every factual prompt built for ``model`` in its tokenizer's chat template from now
    on (``enabled=False``: back to plain prompts). Raises :class:`~tracing.errors.InvalidInput`
    when the tokenizer has none."""
    if enabled:
        check_chat_template(model)
    setattr(model, _CHAT_ATTR, bool(enabled))


def chat_template_on(model: HookedModel) -> bool:
    """Whether prompts for ``model`` are wrapped in its chat template."""
    return bool(getattr(model, _CHAT_ATTR, False))


def render_chat(model: HookedModel, prompt: str) -> tuple[str, int]:
    """``prompt`` as the user's message of a chat with the generation prompt appended, and the
    character index where ``prompt`` starts in that text.

    A leading BOS written by the template is dropped when the model's BOS rule prepends one
    anyway (:func:`tracing.models.prepends_bos`), so a prompt never starts with two. Raises
    :class:`~tracing.errors.InvalidInput` when the tokenizer has no template, or when the
    template does not copy the message verbatim (then no subject position can be mapped).
    """
    check_chat_template(model)
    tok = model.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(text, str):
        raise InvalidInput(f"chat template of {model_name(model)} did not render to text")
    bos = getattr(tok, "bos_token", None)
    if bos and prepends_bos(model) and text.startswith(bos):
        text = text[len(bos) :]
    start = text.rfind(prompt)  # the user's message is the last thing before the reply
    if start < 0:
        raise InvalidInput(
            f"chat template of {model_name(model)} does not copy the prompt {prompt!r} "
            "verbatim; the subject cannot be located in the wrapped text"
        )
    return text, start


def wrap_prompt(model: HookedModel, prompt: str) -> tuple[str, int]:
    """The text to tokenise for ``prompt`` and the offset of ``prompt`` inside it: the chat
    form (:func:`render_chat`) when the model's chat template is on, else ``(prompt, 0)``."""
    if not chat_template_on(model):
        return prompt, 0
    return render_chat(model, prompt)


def prompt_text(model: HookedModel, prompt: str) -> str:
    """The text to tokenise for ``prompt`` (see :func:`wrap_prompt`)."""
    return wrap_prompt(model, prompt)[0]
