"""Typed hyper-parameters of the editing methods, with per-model defaults kept as JSON files.

Each method defines its own dataclass (a subclass of :class:`Hparams`, in its module under
:mod:`editing.methods`); this module holds what they share: JSON round trips with unknown keys
refused, range checks, the target optimisation's :class:`TargetHparams`, the statistics and
context-template settings of ROME-like methods (:class:`KeyValueHparams`), and reading the
shipped default files (:func:`read_hparams`).

Defaults live in ``editing/hparams_defaults/{family}_{model}.json`` (e.g. ``rome_gpt2-xl.json``,
``memit_gemma-3-270m.json``, ``ft_gpt-j-6b.json``); each file's ``"_source"`` says where its
numbers come from (the published ROME / MEMIT hparams files, or tuning on the embedded model).
A model without its own file gets ``{family}_default.json``, whose layer choice is empty
(``null``): pass the layers explicitly (e.g. from ``select-layers``). Files are found by the
model's name, another spelling of it, or a local folder's ``config.json``
(:mod:`editing.hparams_files`): published numbers ship for GPT-2 XL, GPT-J 6B, Llama-3-8B
and its Instruct model, Qwen2.5-7B and its Instruct model, and Mistral-7B-v0.3 (ROME and
MEMIT; no AlphaEdit numbers are published for Mistral).

A file may hold ``"variants"``: settings that hold only when a field takes a value, keyed
``"field=value"`` (``ft_gemma-3-270m.json``: ``"params=block"`` tunes block 2 with its own
bound, as Zhu et al.'s study on this model chose, while the down-projection form keeps its
layer). The field's value is the caller's override, else the file's; a variant's settings
replace the file's and are themselves replaced by what the method's name fixes and by the
caller's overrides.

Mapping from the published files: ``v_num_grad_steps`` -> ``target.num_steps``, ``v_lr`` ->
``target.lr``, ``v_loss_layer`` -> ``target.loss_layer``, ``v_weight_decay`` ->
``target.weight_decay``, ``clamp_norm_factor`` and ``kl_factor`` -> the same names under
``target``; ``mom2_update_weight`` is MEMIT's lambda. The papers' ``mom2_n_samples`` counts
Wikipedia *articles* (each up to the model's context); ``mom2_n_tokens`` here counts tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, no_type_check

from editing.hparams_files import (  # noqa: F401  (re-exported)
    ALIASES,
    CONFIG_SIGNATURES,
    config_key,
    default_file,
    defaults_dir,
    model_key,
    read_file,
)
from tracing.errors import InvalidHparams

log = logging.getLogger(__name__)

H = TypeVar("H", bound="Hparams")


# --------------------------------------------------------------------------- checks


def check_number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Refuse anything but a positive (or, with ``allow_zero``, non-negative) number."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if not ok or value < 0 or (value == 0 and not allow_zero) or value == float("inf"):
        kind = "non-negative" if allow_zero else "positive"
        raise InvalidHparams(f"{name} must be a finite {kind} number, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int = 0) -> None:
    """Refuse anything but an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidHparams(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_layers(name: str, layers: Any) -> list[int] | None:
    """A sorted list of distinct layer indices (an int counts as one layer), or None."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list | tuple) or not layers:
        raise InvalidHparams(f"{name} must be a non-empty list of layer indices, got {layers!r}")
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise InvalidHparams(f"{name}: {x!r} is not a layer index")
        out.append(int(x))
    if len(set(out)) != len(out):
        raise InvalidHparams(f"{name}: repeated layer in {out}")
    return sorted(out)


def _template_settings(value: Any) -> list[tuple[int, int]]:
    try:
        pairs = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError) as exc:
        raise InvalidHparams(
            f"context_templates must be a list of (length, count) pairs, got {value!r}"
        ) from exc
    if any(a < 1 or b < 0 for a, b in pairs):
        raise InvalidHparams(f"context_templates need length >= 1 and count >= 0, got {pairs}")
    return pairs


# --------------------------------------------------------------------------- base classes


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class Hparams:
    """Base of every method's hyper-parameters: JSON round trips and the edited layers.

    ``family`` names the default files (``{family}_{model}.json``); subclasses hold either
    ``layer`` (one layer) or ``layers``.
    """

    family: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``from_dict`` reads it back."""
        d = asdict(self)
        if "context_templates" in d:
            d["context_templates"] = [list(p) for p in d["context_templates"]]
        return d

    @classmethod
    def from_dict(cls: type[H], d: Mapping[str, Any]) -> H:
        """Build from a dict (keys starting with ``_`` are comments); unknown keys are refused
        with an error naming them."""
        if not isinstance(d, Mapping):
            raise InvalidHparams(f"expected a dict of hyper-parameters, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if not str(k).startswith("_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidHparams(
                f"unknown {cls.__name__} hyper-parameter(s) {unknown}; known: {sorted(known)}"
            )
        try:
            return cls(**cls.coerce(d))
        except TypeError as exc:  # a required field is missing
            raise InvalidHparams(f"{cls.__name__}: {exc}") from exc

    @classmethod
    def coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """JSON values turned into the fields' types (subclasses with nested values
        override this); the constructor then checks ranges."""
        return d

    @property
    def layers(self) -> list[int]:
        """The layers an edit with these hyper-parameters changes (empty: none chosen)."""
        value = getattr(self, "layer", None)
        return [] if value is None else [int(value)]

    def with_layers(self: H, layers: Sequence[int]) -> H:
        """A copy editing ``layers`` instead."""
        names = {f.name for f in fields(self)}
        if "layers" in names:
            return dataclasses.replace(self, layers=list(layers))  # type: ignore[call-arg]
        if len(layers) != 1:
            raise InvalidHparams(f"{type(self).__name__} edits exactly one layer; got {layers}")
        return dataclasses.replace(self, layer=int(layers[0]))  # type: ignore[call-arg]


#: The published objective of ROME's ``compute_v`` and MEMIT's ``compute_z`` (the defaults),
#: and the departures factscope offers, each a named choice (see :class:`TargetHparams`).
OBJECTIVE_CHOICES: dict[str, tuple[str, ...]] = {
    "weight_decay_form": ("norm", "squared"),
    "kl_direction": ("new_orig", "orig_new"),
    "kl_position": ("subject_last", "last"),
    "parametrization": ("direct", "scaled"),
    "early_stop_on": ("total", "nll"),
}


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class TargetHparams(Hparams):
    """The optimisation of ROME's v* / MEMIT's z (shared by both methods).

    Per request, Adam minimises ``NLL + kl_factor * KL + weight decay`` over ``delta`` (see
    :mod:`editing.targets.target_loss`), ``num_steps`` steps at most, keeping ``||delta|| <=
    clamp_norm_factor * ||init||``. ``loss_layer`` -1 means the last layer.

    The defaults are the reference code's (ROME's ``compute_v``, MEMIT's ``compute_z``); each
    departure is a named choice:

    * ``weight_decay_form``: ``"norm"`` ``wd * ||delta|| / ||init||^2`` (reference) or
      ``"squared"`` ``wd * ||delta||^2 / ||init||^2`` (a smooth penalty; stops short of the
      clamp);
    * ``kl_direction``: ``"new_orig"`` KL(p_new || p_orig) (reference: ``kl_div(p_orig, p_new)``)
      or ``"orig_new"`` KL(p_orig || p_new);
    * ``kl_position``: where the KL prompt "{subject} is a" is read: ``"subject_last"``
      (reference) or ``"last"`` (the word after "is a");
    * ``parametrization``: ``"direct"`` (Adam on ``delta``; the reference, whose published
      learning rates assume it) or ``"scaled"`` (Adam on ``delta / s`` with ``s`` the typical
      coordinate size of ``init``, so one ``lr`` fits models of any activation scale);
    * ``early_stop_on``: stop a request once its ``"total"`` loss (reference) or its target
      ``"nll"`` alone is below ``early_stop_loss`` (the reference's 5e-2).

    An addition to the papers' objective, off by default (``neighbour_kl_factor`` 0, so
    every shipped configuration is unchanged): ``neighbour_kl_factor * mean KL`` over
    ``neighbour_prompts`` neighbour-like prompts, the request's template filled with other
    subjects of its relation (:func:`editing.requests.prepared.neighbour_prompts`), with ``delta``
    added at *their* subject's last token and the KL (direction ``kl_direction``) read at
    their last position, where their own answer is predicted. It asks that the vector, were
    it to reach another subject of the relation, leave that subject's answer alone: a
    preservation term on neighbouring inputs as in MEND's locality loss (Mitchell et al. 2022,
    "Fast Model Editing at Scale", L_loc), on CounterFact's notion of a neighbour (Meng et al.
    2022). A lever of the specificity sweep (docs/RESULTS.md); the ``"total"`` early-stop rule
    includes it.
    """

    num_steps: int = 20
    lr: float = 0.5
    loss_layer: int = -1
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    weight_decay_form: str = "norm"
    kl_direction: str = "new_orig"
    kl_position: str = "subject_last"
    parametrization: str = "direct"
    early_stop_on: str = "total"
    neighbour_kl_factor: float = 0.0
    neighbour_prompts: int = 10

    def to_dict(self) -> dict:
        """As :meth:`Hparams.to_dict`, leaving out the neighbour term's fields while it is
        off: the records (and target-cache keys) of every configuration without it stay
        exactly what they were before the term existed."""
        d = super().to_dict()
        if self.neighbour_kl_factor == 0:
            d.pop("neighbour_kl_factor")
            d.pop("neighbour_prompts")
        return d

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps)
        check_number("neighbour_kl_factor", self.neighbour_kl_factor, allow_zero=True)
        check_int("neighbour_prompts", self.neighbour_prompts, minimum=1)
        check_number("lr", self.lr)
        check_number("weight_decay", self.weight_decay, allow_zero=True)
        check_number("clamp_norm_factor", self.clamp_norm_factor)
        check_number("kl_factor", self.kl_factor, allow_zero=True)
        check_number("early_stop_loss", self.early_stop_loss, allow_zero=True)
        check_int("loss_layer", self.loss_layer, minimum=-1)
        for name, allowed in OBJECTIVE_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InvalidHparams(
                    f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class KeyValueHparams(Hparams):
    """What ROME-like methods share: the target optimisation (``target``), the second-moment
    statistics (``mom2_*`` over ``corpus``) and the context templates (``(length, count)``
    pairs of model-written prefixes)."""

    target: TargetHparams = field(default_factory=TargetHparams)
    mom2_update_weight: float = 1.0
    mom2_n_tokens: int = 100_000
    mom2_dtype: str = "float32"
    corpus: str = "wikitext"
    context_templates: list[tuple[int, int]] = field(default_factory=lambda: [(5, 10), (10, 10)])

    @classmethod
    def coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``target`` from a dict, ``context_templates`` from lists of pairs."""
        out = dict(d)
        if isinstance(out.get("target"), Mapping):
            out["target"] = TargetHparams.from_dict(out["target"])
        if "context_templates" in out:
            out["context_templates"] = _template_settings(out["context_templates"])
        return out

    def __post_init__(self) -> None:
        if not isinstance(self.target, TargetHparams):
            raise InvalidHparams(
                f"target must be an object of TargetHparams fields, got {self.target!r}"
            )
        if self.mom2_dtype not in ("float32", "float64"):
            raise InvalidHparams(
                f"mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}"
            )
        check_int("mom2_n_tokens", self.mom2_n_tokens, minimum=1)
        check_number("mom2_update_weight", self.mom2_update_weight, allow_zero=True)
        if not isinstance(self.corpus, str) or not self.corpus:
            raise InvalidHparams(f"corpus must be a non-empty string, got {self.corpus!r}")
        self.context_templates = _template_settings(self.context_templates)


def read_hparams(
    cls: type[H],
    model_name: str | None = None,
    path: str | Path | None = None,
    *,
    fixed: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> H:
    """Hyper-parameters of class ``cls`` from ``path``, else from the shipped defaults of
    ``model_name`` (or the family's ``_default`` file, with a logged note).

    ``fixed``: fields a method's name implies (e.g. ``ft-l`` -> ``mode="constrained"``),
    applied over the file unless ``overrides`` set ``mode``. ``overrides`` replace fields;
    names of :class:`TargetHparams` fields (e.g. ``kl_factor=0.1``) replace those inside
    ``target``; a one-layer class also takes ``layers=[L]`` for ``layer=L``. Unknown names
    raise :class:`~tracing.errors.InvalidHparams` naming them.
    """
    src = Path(path) if path is not None else default_file(cls.family, model_name)
    data = read_file(src)
    top = {f.name for f in fields(cls)}
    implied = dict(fixed) if fixed and "mode" not in overrides else {}
    data.update(_variant(src, data.pop("variants", {}), {**data, **implied, **overrides}, top))
    data.update(implied)
    if "layers" in overrides and "layers" not in top and "layer" in top:
        layers = check_layers("layers", overrides.pop("layers"))
        if layers is not None and len(layers) != 1:
            raise InvalidHparams(f"{cls.family.upper()} edits one layer; got layers {layers}")
        overrides["layer"] = None if layers is None else layers[0]
    target_names = {f.name for f in fields(TargetHparams)} if "target" in top else set()
    unknown = sorted(k for k in overrides if k not in top and k not in target_names)
    if unknown:
        raise InvalidHparams(
            f"unknown {cls.family} hyper-parameter(s) {unknown}; "
            f"known: {sorted(top | target_names)}"
        )
    for key, value in overrides.items():
        if key in top:
            data[key] = value
        else:
            target = data.get("target", {})
            target = target.to_dict() if isinstance(target, TargetHparams) else dict(target)
            data["target"] = {**target, key: value}
    try:
        return cls.from_dict(data)
    except InvalidHparams as exc:
        raise InvalidHparams(f"{src}: {exc}") from exc


def _variant(src: Path, variants: Any, values: Mapping[str, Any], known: set[str]) -> dict:
    """The settings of every variant of a file (``{"field=value": {...}}``) whose field has
    that value in ``values`` (the file's fields with the caller's overrides)."""
    if not isinstance(variants, Mapping):
        raise InvalidHparams(f"{src}: variants must be an object of 'field=value' keys")
    out: dict[str, Any] = {}
    for key, settings in variants.items():
        name, sep, value = str(key).partition("=")
        if not sep or name not in known or not isinstance(settings, Mapping):
            raise InvalidHparams(
                f"{src}: variant {key!r} must be 'field=value' (a known field) with an object"
            )
        if str(values.get(name)) == value:
            out.update(settings)
    return out
