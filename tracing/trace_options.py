"""The settings of a causal trace: every option checked, with one-line errors, before any
model run (:func:`trace_settings`), and their defaults."""

from __future__ import annotations

from collections.abc import Sequence

from tracing.attribution import DEFAULT_EXACT_TOP, DEFAULT_SPACE, SPACES
from tracing.corruption import CORRUPTIONS, DEFAULT_CORRUPTION
from tracing.errors import InvalidInput
from tracing.metrics import DEFAULT_DIRECTION, DEFAULT_METRIC, check_metric
from tracing.models import HookedModel, fingerprint, model_name, n_layers
from tracing.noise import DEFAULT_NOISE, NoiseSpec, resolve_noise
from tracing.results import ALL_KINDS, KINDS, TOKEN_SETS, TraceSettings
from tracing.severing import (
    DEFAULT_SEVERED_NOISE,
    SEVERED_NOISE,
    check_kind,
    check_window,
    parse_kind,
)

__all__ = ["DEFAULT_WINDOW", "ENGINES", "METHODS", "check_measure", "trace_settings"]

DEFAULT_WINDOW = {
    "resid": 1,
    "mlp": 10,
    "attn": 10,
    "resid/mlp-severed": 1,
    "resid/attn-severed": 1,
}
#: What :func:`restored_probs` computes with: two exact engines and the AtP estimate.
ENGINES = ("fast", "reference", "atp")
#: What :func:`trace_fact` takes: the exact engines, AtP, and AtP verified by the fast engine.
METHODS = ("fast", "reference", "atp", "atp+exact")


def trace_settings(
    model: HookedModel,
    *,
    kinds: Sequence[str] = KINDS,
    window: int | dict[str, int] | None = None,
    noise: str | float = DEFAULT_NOISE,
    uniform_noise: bool = False,
    samples: int = 10,
    seed: int = 1,
    method: str = "fast",
    exact_top: float = DEFAULT_EXACT_TOP,
    atp_space: str = DEFAULT_SPACE,
    corruption: str = DEFAULT_CORRUPTION,
    replacement: str | None = None,
    direction: str = DEFAULT_DIRECTION,
    metric: str = DEFAULT_METRIC,
    normalise: bool = False,
    severed_noise: str = DEFAULT_SEVERED_NOISE,
    tokens: str = "all",
) -> tuple[TraceSettings, NoiseSpec]:
    """The settings a trace with these arguments is made with (checked, noise resolved to a
    level), and the noise specification; see :func:`trace_fact` for the arguments."""
    traced = check_measure(
        kinds,
        method=method,
        corruption=corruption,
        replacement=replacement,
        direction=direction,
        metric=metric,
        normalise=normalise,
        severed_noise=severed_noise,
        tokens=tokens,
    )
    severed = [k for k in traced if parse_kind(k)]
    windows = dict(DEFAULT_WINDOW)
    if isinstance(window, int):
        windows.update(mlp=window, attn=window)
    elif window is not None:
        windows.update(window)
    for k, w in windows.items():
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise InvalidInput(f"window for {k} must be an integer >= 1, got {w!r}")
    for k in severed:
        check_window(k, windows[k], n_layers(model))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidInput(f"samples must be an integer >= 1, got {samples!r}")
    if method not in METHODS:
        raise InvalidInput(f"unknown method {method!r}; expected one of {METHODS}")
    if not isinstance(exact_top, int | float) or isinstance(exact_top, bool):
        raise InvalidInput(f"exact_top must be a fraction in [0, 1], got {exact_top!r}")
    if atp_space not in SPACES:
        raise InvalidInput(f"unknown AtP space {atp_space!r}; expected one of {SPACES}")
    if not 0 <= exact_top <= 1:
        raise InvalidInput(f"exact_top must be a fraction in [0, 1], got {exact_top!r}")
    spec = resolve_noise(model, noise, uniform_noise)
    settings = TraceSettings(
        kinds=traced,
        window={k: windows[k] for k in traced},
        noise=spec.level,
        noise_spec=spec.spec,
        sigma=spec.sigma,
        uniform_noise=uniform_noise,
        samples=samples,
        seed=seed,
        method=method,
        model=model_name(model),
        model_fingerprint=fingerprint(model),
        exact_top=float(exact_top) if method == "atp+exact" else None,
        atp_space=atp_space if method.startswith("atp") else None,
        corruption=corruption,
        replacement=replacement,
        direction=direction,
        metric=metric,
        normalise=bool(normalise),
        severed_noise=severed_noise if severed else None,
        tokens=tokens,
    )
    if corruption == "replace":  # one corrupted run: the replaced prompt
        settings.samples = 1
    return settings, spec


def check_measure(
    kinds: Sequence[str] = KINDS,
    *,
    method: str = "fast",
    corruption: str = DEFAULT_CORRUPTION,
    replacement: str | None = None,
    direction: str = DEFAULT_DIRECTION,
    metric: str = DEFAULT_METRIC,
    normalise: bool = False,
    severed_noise: str = DEFAULT_SEVERED_NOISE,
    subject: str | None = None,
    tokens: str = "all",
) -> tuple[str, ...]:
    """Check the kinds and what a trace measures without a model (the command line calls
    this before it loads one); returns the kinds in result order. One-line errors: unknown
    or inapplicable kinds, a severed kind in the noising direction, an unknown corruption,
    direction, metric or severed noise, a replacement without ``replace`` or equal to
    ``subject``, AtP asked for what it cannot estimate, an unknown token set (``tokens``:
    :data:`tracing.results.TOKEN_SETS`) or one row traced by AtP."""
    if not kinds or isinstance(kinds, str):
        raise InvalidInput("no kinds to trace" if not kinds else "kinds must be a list of kinds")
    for k in kinds:
        check_kind(k)
    traced = tuple(k for k in ALL_KINDS if k in set(kinds))
    severed = [k for k in traced if parse_kind(k)]
    _check_options(corruption, replacement, direction, metric, normalise, severed_noise)
    if subject is not None and replacement is not None and replacement.strip() == subject.strip():
        raise InvalidInput(f"the replacement subject {replacement!r} is the subject itself")
    if severed and direction != "denoise":
        raise InvalidInput(
            f"severed kinds {severed} restore clean states into the corrupted run: they need "
            "direction 'denoise'"
        )
    if tokens not in TOKEN_SETS:
        raise InvalidInput(f"unknown tokens {tokens!r}; expected one of {TOKEN_SETS}")
    if tokens != "all" and method.startswith("atp"):
        raise InvalidInput(
            f"tokens {tokens!r} measures one row per kind exactly, as cheaply as AtP would "
            f"estimate it: use --method fast or reference, not {method!r}"
        )
    if method.startswith("atp") and (metric != "prob" or direction != "denoise"):
        raise InvalidInput(
            f"AtP estimates the answer's probability restored into the corrupted run only "
            f"(metric 'prob', direction 'denoise'), not metric {metric!r} / direction "
            f"{direction!r}; use --method fast"
        )
    return traced


def _check_options(
    corruption: str,
    replacement: str | None,
    direction: str,
    metric: str,
    normalise: bool,
    severed_noise: str,
) -> None:
    """One-line errors for the corruption, direction, metric and severing options."""
    if corruption not in CORRUPTIONS:
        raise InvalidInput(f"unknown corruption {corruption!r}; expected one of {CORRUPTIONS}")
    if replacement is not None and corruption != "replace":
        raise InvalidInput(
            "a replacement subject needs corruption 'replace' (--corruption replace)"
        )
    if replacement is not None and (not isinstance(replacement, str) or not replacement.strip()):
        raise InvalidInput(f"empty replacement subject {replacement!r}")
    check_metric(metric, direction)
    if not isinstance(normalise, bool):
        raise InvalidInput(f"normalise must be True or False, got {normalise!r}")
    if severed_noise not in SEVERED_NOISE:
        raise InvalidInput(
            f"unknown severed_noise {severed_noise!r}; expected one of {SEVERED_NOISE}"
        )
