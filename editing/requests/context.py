"""Context templates: short prefixes put before an edit prompt so that an edit generalises.

ROME and MEMIT average the key ``k*`` and optimise ``v*`` / ``z`` over several versions of the
edit prompt, each preceded by a short text the model wrote itself ("The best way to ... .
{}"), plus the bare prompt ``"{}"``. :func:`context_templates` generates them with a fixed
seed (top-k sampling from the prefixes ``The``, ``Therefore``, ``Because``, ``I``, ``You``, as in
MEMIT's code) and caches them on disk under ``tracing.loading.cache_dir()/context/``, keyed by
the model fingerprint and the settings. :func:`check_templates` validates templates a user
gives instead. Requests are put into templates once, by
:func:`editing.requests.prepared.prepare_requests`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tracing.errors import InvalidInput
from tracing.io import write_json_atomic
from tracing.loading import cache_dir as _cache_root
from tracing.models import (
    HookedModel,
    fingerprint,
    model_device,
    tokenize,
)

log = logging.getLogger(__name__)

PREFIXES: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
CACHE_FORMAT = 2  # 2: templates stored by group


def check_templates(templates: Sequence[str]) -> list[str]:
    """Validate context templates and return them with the bare ``"{}"`` first.

    Each template must be a string holding exactly one ``"{}"`` (where the edit prompt goes);
    other braces are allowed (templates are filled with ``str.replace``, never ``format``).
    Duplicates are dropped. Raises InvalidInput naming the bad template.
    """
    if isinstance(templates, str):
        raise InvalidInput("context templates must be a list of strings, not one string")
    out: list[str] = ["{}"]
    for i, t in enumerate(templates):
        if not isinstance(t, str):
            raise InvalidInput(f"context template {i} is not a string: {t!r}")
        if t.count("{}") != 1:
            raise InvalidInput(
                f"context template {i} ({t!r}) must contain '{{}}' exactly once "
                f"(found {t.count('{}')})"
            )
        if t not in out:
            out.append(t)
    return out


def fill_template(template: str, prompt: str) -> str:
    """``template`` with its ``"{}"`` replaced by ``prompt`` (braces in either are kept)."""
    return template.replace("{}", prompt, 1)


def _settings_key(
    model: HookedModel, length_params: Sequence[tuple[int, int]], seed: int, top_k: int
) -> str:
    spec = json.dumps(
        {
            "lengths": [list(p) for p in length_params],
            "seed": seed,
            "top_k": top_k,
            "prefixes": list(PREFIXES),
            "format": CACHE_FORMAT,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return f"{fingerprint(model)}-{digest}"


def _special_ids(model: HookedModel) -> list[int]:
    ids = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    return sorted(i for i in ids if i is not None and 0 <= i < int(model.cfg.d_vocab))


def generate_texts(
    model: HookedModel,
    prefix: str,
    n: int,
    length: int,
    *,
    generator: torch.Generator,
    top_k: int = 5,
) -> list[str]:
    """Sample ``n`` continuations of ``prefix`` with top-k sampling, each ``length`` tokens
    long in total (prefix included, BOS not counted), decoded without special tokens."""
    if n < 1:
        return []
    start = tokenize(model, prefix)
    bos = len(start) - len(model.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    toks = torch.tensor([start] * n, dtype=torch.long, device=model_device(model))
    banned = _special_ids(model)
    with torch.no_grad():
        while toks.shape[1] - bos < length:
            logits = model(toks, logits_to_keep=1, use_cache=False)[:, -1].float()
            if banned:
                logits[:, banned] = float("-inf")
            vals, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            # Sampled on the CPU with the CPU generator: the same seed gives the same
            # templates whatever device the model runs on.
            probs = torch.softmax(vals, dim=-1).cpu()
            choice = torch.multinomial(probs, 1, generator=generator).to(idx.device)
            toks = torch.cat([toks, idx.gather(1, choice)], dim=1)
    return [model.tokenizer.decode(row[bos:].tolist(), skip_special_tokens=True) for row in toks]


def context_template_groups(
    model: HookedModel,
    length_params: Sequence[tuple[int, int]] | Sequence[Sequence[int]] = ((5, 10), (10, 10)),
    *,
    seed: int = 0,
    top_k: int = 5,
    cache: bool = True,
    cache_dir: Path | None = None,
) -> list[list[str]]:
    """The model's own context templates by group: ``[["{}"], [<texts of the first length>.
    {}, ...], ...]``, one group per ``(length, count)`` pair of ``length_params`` (as in ROME's
    and MEMIT's hyper-parameters): ``count`` texts of ``length`` tokens each, spread over the
    prefixes The / Therefore / Because / I / You. MEMIT averages keys per group first
    (:func:`editing.statistics.keys.subject_keys`). Generation is seeded (``seed``) and the
    result is cached on disk (``cache_dir``, default ``tracing.loading.cache_dir()/context``)
    per model fingerprint and settings, so the same model always gets the same templates.
    Braces in generated text become spaces; a template repeated in a later group is dropped there.
    """
    params = [(int(a), int(b)) for a, b in length_params]
    for length, count in params:
        if length < 1 or count < 0:
            raise InvalidInput(f"bad context template setting (length={length}, count={count})")
    folder = Path(cache_dir) if cache_dir is not None else _cache_root() / "context"
    path = folder / f"{_settings_key(model, params, seed, top_k)}.json"
    if cache and path.is_file():
        try:
            stored = json.loads(path.read_text())["groups"]
            check_templates([t for g in stored for t in g])
            return [list(g) for g in stored]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable context-template cache %s", path)
    gen = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [["{}"]]
    seen = {"{}"}
    for length, count in params:
        texts: list[str] = []
        for i, prefix in enumerate(PREFIXES):
            n = count // len(PREFIXES) + (1 if i < count % len(PREFIXES) else 0)
            texts += generate_texts(model, prefix, n, length, generator=gen, top_k=top_k)
        group = []
        for t in texts:
            template = t.replace("{", " ").replace("}", " ").replace("\n", " ") + ". {}"
            if template not in seen:
                seen.add(template)
                group.append(template)
        if group:
            groups.append(group)
    check_templates([t for g in groups for t in g])
    if cache:
        payload = {"settings": {"lengths": params, "seed": seed, "top_k": top_k}, "groups": groups}
        write_json_atomic(path, payload)
    return groups


def context_templates(
    model: HookedModel,
    length_params: Sequence[tuple[int, int]] | Sequence[Sequence[int]] = ((5, 10), (10, 10)),
    **kwargs: Any,
) -> list[str]:
    """The model's own context templates as one list, ``["{}", "<text>. {}", ...]`` (see
    :func:`context_template_groups`, which takes the same keyword arguments)."""
    groups = context_template_groups(model, length_params, **kwargs)
    return [t for g in groups for t in g]
