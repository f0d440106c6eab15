"""Typed hyper-parameters of the editing methods, with per-model defaults kept as JSON files.

Defaults live in ``editing/hparams_defaults/{method}_{model}.json`` (e.g. ``rome_gpt2-xl.json``,
``memit_gemma-3-270m.json``, ``ft_gpt-j-6b.json``); each file's ``"_source"`` says where its
numbers come from (the published ROME / MEMIT hparams files, or tuning on the embedded model).
A model without its own file gets ``{method}_default.json``, whose layer choice is empty
(``null``): pass the layers explicitly (e.g. from ``select-layers``).

Mapping from the published files: ``v_num_grad_steps`` -> ``target.num_steps``, ``v_lr`` ->
``target.lr``, ``v_loss_layer`` -> ``target.loss_layer``, ``v_weight_decay`` ->
``target.weight_decay``, ``clamp_norm_factor`` and ``kl_factor`` -> the same names under
``target``; ``mom2_update_weight`` is MEMIT's lambda. The papers' ``mom2_n_samples`` counts
Wikipedia *articles* (each up to the model's context); ``mom2_n_tokens`` here counts tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METHODS = ("rome", "memit", "ft")
FT_MODES = ("constrained", "unconstrained", "mixed")
# method names the editing API uses -> (file family, FT mode forced by the name)
_ALIASES: dict[str, tuple[str, str | None]] = {
    "rome": ("rome", None),
    "memit": ("memit", None),
    "ft": ("ft", "unconstrained"),
    "ft-l": ("ft", "constrained"),
    "mixed": ("ft", "mixed"),
}


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}"
        )


def _check_layers(name: str, layers: Any) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list | tuple) or not layers:
        raise ValueError(f"{name} must be a non-empty list of layer indices, got {layers!r}")
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name}: {x!r} is not a layer index")
        out.append(int(x))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated layer in {out}")
    return sorted(out)


def _templates(value: Any) -> list[tuple[int, int]]:
    try:
        pairs = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"context_templates must be a list of (length, count) pairs, got {value!r}"
        ) from exc
    if any(a < 1 or b < 0 for a, b in pairs):
        raise ValueError(f"context_templates need length >= 1 and count >= 0, got {pairs}")
    return pairs


class _Dictable:
    def to_dict(self) -> dict:
        """A JSON-ready dict; ``from_dict`` reads it back."""
        d = asdict(self)  # type: ignore[call-overload]
        if "context_templates" in d:
            d["context_templates"] = [list(p) for p in d["context_templates"]]
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a dict (keys starting with ``_`` are comments); unknown keys raise a
        ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict of hyper-parameters, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} hyper-parameter(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**d)


@dataclass
class TargetHparams(_Dictable):
    """The optimisation of ROME's v* / MEMIT's z (shared by both methods).

    ``loss_layer`` -1 means the last layer; ``clamp_norm_factor`` bounds the added vector's
    norm by this multiple of the original output's norm; ``early_stop_loss``: stop once the
    mean NLL of the target falls below it (ROME's 5e-2).
    """

    num_steps: int = 20
    lr: float = 0.5
    loss_layer: int = -1
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int):
            raise ValueError(f"num_steps must be an integer, got {self.num_steps!r}")
        _positive("num_steps", self.num_steps, allow_zero=True)
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("clamp_norm_factor", self.clamp_norm_factor)
        _positive("kl_factor", self.kl_factor, allow_zero=True)
        _positive("early_stop_loss", self.early_stop_loss, allow_zero=True)
        if isinstance(self.loss_layer, bool) or not isinstance(self.loss_layer, int):
            raise ValueError(f"loss_layer must be an integer, got {self.loss_layer!r}")


def _target(value: Any) -> TargetHparams:
    if isinstance(value, TargetHparams):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"target must be an object of TargetHparams fields, got {value!r}")
    return TargetHparams.from_dict(value)


def _check_stats(hp: Any) -> None:
    if hp.mom2_dtype not in ("float32", "float64"):
        raise ValueError(f"mom2_dtype must be 'float32' or 'float64', got {hp.mom2_dtype!r}")
    if isinstance(hp.mom2_n_tokens, bool) or not isinstance(hp.mom2_n_tokens, int):
        raise ValueError(f"mom2_n_tokens must be an integer, got {hp.mom2_n_tokens!r}")
    _positive("mom2_n_tokens", hp.mom2_n_tokens)
    _positive("mom2_update_weight", hp.mom2_update_weight, allow_zero=True)
    if not isinstance(hp.corpus, str) or not hp.corpus:
        raise ValueError(f"corpus must be a non-empty string, got {hp.corpus!r}")
    hp.context_templates = _templates(hp.context_templates)


@dataclass
class RomeHparams(_Dictable):
    """ROME: one rank-one update of the down-projection of ``layer``.

    ``mom2_update_weight`` (lambda) is kept for methods that add lambda*C to a least-squares
    system; ROME's own closed form (W + (v* - W k*)(C^-1 k*)^T / (k*^T C^-1 k*)) does not
    depend on the scale of C, so the original ROME has no lambda and its value is unused there.
    ``consistent_key``: r-ROME's fix, the same template-averaged key in the update and in v*.
    ``layer`` None (only in ``_default`` files): the caller must choose the layer.
    """

    layer: int | None
    target: TargetHparams = field(default_factory=TargetHparams)
    mom2_update_weight: float = 1.0
    mom2_n_tokens: int = 100_000
    mom2_dtype: str = "float32"
    corpus: str = "wikitext"
    context_templates: list[tuple[int, int]] = field(default_factory=lambda: [(5, 10), (10, 10)])
    consistent_key: bool = True

    def __post_init__(self) -> None:
        if self.layer is not None:
            self.layer = _check_layers("layer", self.layer)[0]  # type: ignore[index]
        self.target = _target(self.target)
        _check_stats(self)

    @property
    def layers(self) -> list[int]:
        """``[layer]`` (empty when no layer is set)."""
        return [] if self.layer is None else [self.layer]


@dataclass
class MemitHparams(_Dictable):
    """MEMIT: least-squares updates of the down-projections of ``layers`` (lambda =
    ``mom2_update_weight`` times the per-token second moment). ``norm_aware``: account for a
    norm between the down-projection and the residual add (Gemma) when spreading the residual.
    ``layers`` None (only in ``_default`` files): the caller must choose the layers."""

    layers: list[int] | None
    target: TargetHparams = field(default_factory=TargetHparams)
    mom2_update_weight: float = 15000.0
    mom2_n_tokens: int = 100_000
    mom2_dtype: str = "float32"
    corpus: str = "wikitext"
    context_templates: list[tuple[int, int]] = field(default_factory=lambda: [(5, 10), (10, 10)])
    norm_aware: bool = True

    def __post_init__(self) -> None:
        self.layers = _check_layers("layers", self.layers)
        self.target = _target(self.target)
        _check_stats(self)


@dataclass
class FTHparams(_Dictable):
    """Fine-tuning of the down-projections of ``layers`` (Zhu et al. 2020).

    ``mode``: ``constrained`` (FT-L: after every step each weight is clamped to within
    ``norm_constraint`` (epsilon, l-infinity) of its original value), ``unconstrained``, or
    ``mixed`` (batches mix new facts with ``mixed_ratio`` unmodified facts per new fact). A
    ``norm_constraint`` that is not None bounds the change in every mode.
    """

    layers: list[int] | None
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = 5e-4
    mode: str = "constrained"
    batch_size: int = 8
    mixed_ratio: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self.layers = _check_layers("layers", self.layers)
        _positive("lr", self.lr)
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int):
            raise ValueError(f"num_steps must be an integer, got {self.num_steps!r}")
        _positive("num_steps", self.num_steps, allow_zero=True)
        if self.norm_constraint is not None:
            _positive("norm_constraint", self.norm_constraint)
        if self.mode not in FT_MODES:
            raise ValueError(f"unknown FT mode {self.mode!r}; expected one of {FT_MODES}")
        if self.mode == "constrained" and self.norm_constraint is None:
            raise ValueError("constrained fine-tuning (FT-L) needs a norm_constraint (epsilon)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"batch_size must be an integer, got {self.batch_size!r}")
        _positive("batch_size", self.batch_size)
        _positive("mixed_ratio", self.mixed_ratio, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)


Hparams = RomeHparams | MemitHparams | FTHparams
_CLASSES: dict[str, type] = {"rome": RomeHparams, "memit": MemitHparams, "ft": FTHparams}


# --------------------------------------------------------------------------- defaults


def defaults_dir() -> Path:
    """The folder of the shipped default files."""
    return Path(str(files("editing").joinpath("hparams_defaults")))


def model_key(model_name: str) -> str:
    """File-name form of a model name: the last path component, lower case
    (``EleutherAI/gpt-j-6B`` -> ``gpt-j-6b``; ``/models/gpt2-xl/`` -> ``gpt2-xl``)."""
    return Path(str(model_name).rstrip("/")).name.lower()


def default_file(method: str, model_name: str | None = None) -> Path:
    """The default file used for ``method`` and ``model_name`` (the method's ``_default``
    file when that model has none)."""
    family = _family(method)[0]
    if model_name is not None:
        path = defaults_dir() / f"{family}_{model_key(model_name)}.json"
        if path.exists():
            return path
        log.info("no %s defaults for model %r: using %s_default.json", family, model_name, family)
    return defaults_dir() / f"{family}_default.json"


def _family(method: str) -> tuple[str, str | None]:
    key = str(method).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown editing method {method!r}; expected one of {list(_ALIASES)}")
    return _ALIASES[key]


def _read(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no hyper-parameter file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of hyper-parameters")
    return data


def load_hparams(
    method: str,
    model_name: str | None = None,
    path: str | Path | None = None,
    **overrides: Any,
) -> Hparams:
    """Hyper-parameters for ``method`` (``rome``, ``memit``, ``ft-l``, ``ft``, ``mixed``).

    Read from ``path`` if given, else from the shipped defaults of ``model_name`` (or the
    method's ``_default`` file, with a logged note, for a model without its own file).
    ``ft-l`` / ``ft`` / ``mixed`` read the same ``ft_*`` file and set ``mode`` to
    ``constrained`` / ``unconstrained`` / ``mixed`` (the last two: ``norm_constraint`` None,
    as Zhu et al.'s baselines; override it to bound them) unless ``mode`` is overridden.
    ``overrides`` replace fields; for ROME and MEMIT, names of :class:`TargetHparams` fields
    (e.g. ``kl_factor=0.1``) replace those inside ``target``; ROME also takes ``layers=[L]``
    for ``layer=L``. Unknown names raise a ValueError naming them.
    """
    family, mode = _family(method)
    src = Path(path) if path is not None else default_file(method, model_name)
    data = _read(src)
    cls = _CLASSES[family]
    top = {f.name for f in fields(cls)}
    if mode is not None and "mode" not in overrides:
        data["mode"] = mode
        if mode in ("unconstrained", "mixed"):  # Zhu et al.'s baselines have no bound
            data["norm_constraint"] = None
    if family == "rome" and "layers" in overrides:  # ROME edits one layer: accept [L]
        layers = _check_layers("layers", overrides.pop("layers"))
        if layers is not None and len(layers) != 1:
            raise ValueError(f"ROME edits one layer; got layers {layers}")
        overrides["layer"] = None if layers is None else layers[0]
    target_names = {f.name for f in fields(TargetHparams)} if "target" in top else set()
    unknown = sorted(k for k in overrides if k not in top and k not in target_names)
    if unknown:
        raise ValueError(
            f"unknown {family} hyper-parameter(s) {unknown}; known: {sorted(top | target_names)}"
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
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{src}: {exc}") from exc


def parse_layers(text: str) -> list[int]:
    """Layers from a command-line string: ``"3-8"`` (inclusive range), ``"3,5,7"``, ``"4"``,
    or a mix (``"2-4,7"``); sorted, without repeats. Raises a ValueError saying what is wrong.
    (Checking the layers against a model is :func:`tracing.models.check_layer`'s job.)"""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty layer list: give e.g. 3-8, 3,5,7 or 4")
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(
                f"bad layer spec {part!r} in {text!r}: expected N, N-M or a comma list"
            ) from None
        if a < 0 or b < a:
            raise ValueError(f"bad layer range {part!r} in {text!r}")
        out.update(range(a, b + 1))
    return sorted(out)
