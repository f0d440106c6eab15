"""The configurations of ``benchmarks/specificity_sweep.py``: the table and its parsing.

A :class:`SweepConfig` is a method plus overrides of the shipped Gemma hyper-parameter files
(``editing/hparams_defaults/{rome,memit}_gemma-3-270m.json``). Overrides name fields as
:func:`editing.hparams.read_hparams` takes them: top-level fields (``layer``, ``layers``,
``mom2_n_tokens``, ``mom2_update_weight``, ``consistent_key``, ``context_templates``) or
fields of the target optimisation (``kl_factor``, ``clamp_norm_factor``, ``weight_decay``,
``kl_position``, ...). A value written ``"x4"`` multiplies the shipped value by 4
(``{"kl_factor": "x16"}``). :data:`CONFIGS` is the sweep; :func:`parse_config` reads one more
from the command line (``--add``); :func:`check_configs` resolves and checks them all before
any model is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from editing.hparams import TargetHparams
from editing.methods import get_method
from tracing.errors import InvalidHparams, InvalidInput

log = logging.getLogger("specificity_sweep")

MODEL = "gemma-3-270m"
UNEDITED = "unedited"


@dataclass(frozen=True)
class SweepConfig:
    """One row of the sweep: ``method`` (``rome``, ``memit`` or ``none``) with ``overrides`` of
    the model's shipped hyper-parameters (values ``"xF"`` scale the shipped value by ``F``);
    ``lever`` groups rows in the table, ``note`` says what the row tests. ``subject_weight``
    ``w`` > 0 (ROME): edit with ``(1 - w) C + w C_subj`` in place of the corpus statistics
    ``C``, where ``C_subj`` is the second moment of subject-final keys of other subjects
    (:func:`subject_key_moment`)."""

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    lever: str = "default"
    note: str = ""
    subject_weight: float = 0.0


def _rome(name: str, lever: str, note: str, **overrides: Any) -> SweepConfig:
    return SweepConfig(name, "rome", overrides, lever, note)


def _memit(name: str, lever: str, note: str, **overrides: Any) -> SweepConfig:
    return SweepConfig(name, "memit", overrides, lever, note)


#: The sweep, most informative levers first (rows exist early when it is interrupted).
CONFIGS: tuple[SweepConfig, ...] = (
    SweepConfig(UNEDITED, "none", {}, "baseline", "the unedited model on the same cases"),
    _rome("rome_default", "default", "shipped Gemma file (layer 2, KL 0.0625, clamp 4)"),
    _memit("memit_default", "default", "shipped Gemma file (layers 2-6, lambda 1500)"),
    SweepConfig(
        "rome_subjcov_0.9",
        "rome",
        {},
        "covariance",
        "C -> 0.1 C + 0.9 C_subj (subject-final keys of 2,000 other subjects)",
        subject_weight=0.9,
    ),
    _rome("rome_clamp_1", "clamp", "clamp_norm_factor 4 -> 1", clamp_norm_factor=1.0),
    _rome(
        "rome_nkl_2",
        "neighbour KL",
        "KL over 10 neighbour-like prompts (known_1000 subjects of the relation), factor 2",
        neighbour_kl_factor=2.0,
    ),
    _rome("rome_kl_x16", "KL weight", "kl_factor x16 = 1.0", kl_factor="x16"),
    _rome("rome_wd_x4", "weight decay", "weight_decay 0.5 -> 2", weight_decay="x4"),
    SweepConfig(
        "rome_subjcov_0.5",
        "rome",
        {},
        "covariance",
        "C -> 0.5 C + 0.5 C_subj (subject-final keys of 2,000 other subjects)",
        subject_weight=0.5,
    ),
    _memit(
        "memit_lambda_15000", "MEMIT lambda", "lambda 1500 -> 15000", mom2_update_weight=15000.0
    ),
    _rome("rome_kl_x4", "KL weight", "kl_factor x4 = 0.25", kl_factor="x4"),
    _rome("rome_kl_x0", "KL weight", "no KL term", kl_factor=0.0),
    _rome("rome_layer3", "layer", "layer 2 -> 3", layer=3),
    _rome("rome_layer4", "layer", "layer 2 -> 4", layer=4),
    _memit("memit_lambda_300", "MEMIT lambda", "lambda 1500 -> 300", mom2_update_weight=300.0),
    _memit("memit_layers_3_6", "MEMIT layers", "layers 2-6 -> 3-6", layers=[3, 4, 5, 6]),
    _memit("memit_layers_2_4", "MEMIT layers", "layers 2-6 -> 2-4", layers=[2, 3, 4]),
    _rome("rome_clamp_2", "clamp", "clamp_norm_factor 4 -> 2", clamp_norm_factor=2.0),
    _rome(
        "rome_kl_subject_last",
        "KL prompt",
        "KL read at the subject's last token (reference position)",
        kl_position="subject_last",
    ),
    _rome(
        "rome_kl_new_orig",
        "KL prompt",
        "KL(p_new || p_orig) (reference direction)",
        kl_direction="new_orig",
    ),
    _rome("rome_mom2_20k", "statistics", "mom2_n_tokens 100k -> 20k", mom2_n_tokens=20_000),
    _rome("rome_mom2_400k", "statistics", "mom2_n_tokens 100k -> 400k", mom2_n_tokens=400_000),
    _rome(
        "rome_original_key", "key", "original ROME key (consistent_key false)", consistent_key=False
    ),
    _rome(
        "rome_templates_21",
        "templates",
        "ROME's 21 context templates (5,10),(10,10)",
        context_templates=[[5, 10], [10, 10]],
    ),
    _rome("rome_templates_bare", "templates", "only the bare prompt", context_templates=[[5, 0]]),
    _rome("rome_layer1", "layer", "layer 2 -> 1", layer=1),
    _memit("memit_lambda_5000", "MEMIT lambda", "lambda 1500 -> 5000", mom2_update_weight=5000.0),
)

#: Subjects whose keys make ``C_subj`` (see :func:`subject_key_moment`).


def parse_value(text: str) -> Any:
    """A value from the command line: JSON if it parses (``1.0``, ``[2, 3]``, ``false``), else
    the text itself (``subject_last``, ``x4``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_config(spec: str) -> SweepConfig:
    """``NAME:METHOD:key=value;key=value`` (the overrides may be empty) as a configuration."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise InvalidInput(f"--add expects NAME:METHOD:key=value;..., got {spec!r}")
    overrides: dict[str, Any] = {}
    for item in (parts[2] if len(parts) == 3 else "").split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--add {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = parse_value(value.strip())
    return SweepConfig(parts[0], parts[1].lower(), overrides, "extra", spec)


def _scale(text: str) -> float | None:
    if isinstance(text, str) and text[:1] in "x×":
        try:
            return float(text[1:])
        except ValueError:
            return None
    return None


def resolve_overrides(
    method: str, overrides: Mapping[str, Any], model_name: str = MODEL
) -> dict[str, Any]:
    """``overrides`` with every ``"xF"`` replaced by ``F`` times the shipped value of that field
    for ``model_name``, checked against the method's hyper-parameters (unknown names or bad
    values raise :class:`~tracing.errors.InvalidHparams` naming them)."""
    spec = get_method(method)
    shipped = spec.load_hparams(model_name)
    target_names = {f for f in TargetHparams.__dataclass_fields__}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        factor = _scale(value)
        if factor is None:
            out[key] = value
            continue
        holder = shipped.target if key in target_names and hasattr(shipped, "target") else shipped
        base = getattr(holder, key, None)
        if isinstance(base, bool) or not isinstance(base, int | float):
            raise InvalidHparams(f"{method} {key}: {value!r} scales a number, found {base!r}")
        scaled = base * factor
        if isinstance(base, int) and scaled != int(scaled):
            raise InvalidHparams(f"{method} {key}: {base} x {factor} is not a whole number")
        out[key] = int(scaled) if isinstance(base, int) else float(scaled)
    spec.load_hparams(model_name, **out)  # refuses unknown names and bad values now
    return out


def available(config: SweepConfig) -> bool:
    """Whether every field ``config`` overrides exists in this checkout's hyper-parameters
    (configurations of options added later, e.g. ``neighbour_kl_factor``, are skipped with a
    logged note where the option is missing)."""
    if config.method == "none":
        return True
    known = {f for f in get_method(config.method).hparams.__dataclass_fields__}
    known |= {f for f in TargetHparams.__dataclass_fields__} | {"layers"}
    missing = sorted(set(config.overrides) - known)
    if missing:
        log.info("skipping %s: this checkout has no %s", config.name, missing)
    return not missing


def check_configs(configs: Sequence[SweepConfig], model_name: str = MODEL) -> dict[str, dict]:
    """Every configuration's resolved overrides by name; refuses repeated names, unknown
    methods and bad overrides before any model is loaded."""
    seen: dict[str, dict] = {}
    for c in configs:
        if c.name in seen:
            raise InvalidInput(f"configuration {c.name!r} is listed twice")
        if not c.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise InvalidInput(f"configuration name {c.name!r}: letters, digits, _ - . only")
        if c.subject_weight and (c.method != "rome" or not 0 < c.subject_weight < 1):
            raise InvalidInput(f"{c.name}: subject_weight is for ROME, strictly between 0 and 1")
        if c.method == "none":
            if c.overrides:
                raise InvalidInput(f"{c.name}: the unedited model takes no overrides")
            seen[c.name] = {}
        else:
            seen[c.name] = resolve_overrides(c.method, c.overrides, model_name)
    return seen
