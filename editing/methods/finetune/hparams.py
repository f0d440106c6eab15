"""Hyper-parameters of fine-tuning (Zhu et al. 2020): which tensors, which constraint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import no_type_check

from editing.hparams import Hparams, check_int, check_layers, check_number
from editing.statistics.fisher import LABELS, FisherSettings
from tracing.errors import InvalidHparams, InvalidInput

MODES = ("constrained", "unconstrained", "mixed")
METHOD_NAMES = {"constrained": "ft-l", "unconstrained": "ft", "mixed": "mixed"}
#: What fine-tuning tunes in each chosen block: the MLP down-projection only (ROME's FT-L),
#: the whole MLP, the whole attention, or the whole block (both plus its norms).
PARAMS = ("down_proj", "mlp", "attn", "block")
#: How a constrained run keeps the tuned tensors near their original values.
CONSTRAINTS = ("linf", "fisher")


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class FTHparams(Hparams):
    """Fine-tuning of the tensors ``params`` of blocks ``layers`` (Zhu et al. 2020).

    ``params``: ``down_proj`` (the MLP down-projection only: what ROME's papers call FT-L),
    ``mlp`` (every feed-forward tensor), ``attn`` (every attention tensor) or ``block``
    (both plus the block's norms), in every block of ``layers`` (all blocks: every layer
    index; the CLI's ``--blocks all``). See :mod:`editing.params` for the names.

    ``mode``: ``constrained`` (the paper's constrained fine-tuning), ``unconstrained``
    (plain fine-tuning), or ``mixed`` (batches mix new facts with ``mixed_ratio`` unmodified
    facts per new fact).

    ``constraint`` (modes ``constrained`` and ``mixed``):

    * ``linf``: after every step each tuned number is projected back into
      ``[θ0 − ε, θ0 + ε]``, ``ε = norm_constraint`` (required in mode ``constrained``; in
      ``mixed`` the bound applies when set);
    * ``fisher``: the loss gains ``fisher_weight * Σ_i F_i (θ_i − θ0_i)²`` with ``F`` the
      diagonal Fisher information on unmodified text (:mod:`editing.statistics.fisher`: labels
      ``fisher_labels``, ``fisher_sequences`` WikiText sequences of 128 tokens and
      ``fisher_facts`` known facts), computed once per model and parameter set and cached.
      ``norm_constraint`` is not used. Per token, ``½ Σ F δ²`` approximates the KL divergence
      of the model's next-token distribution on that text, so ``fisher_weight = 0.5`` weighs
      it like the fine-tuning loss.
    """

    family = "ft"

    layers: list[int] | None = None  # type: ignore[assignment]
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = 5e-4
    mode: str = "constrained"
    batch_size: int = 8
    mixed_ratio: float = 1.0
    weight_decay: float = 0.0
    params: str = "down_proj"
    constraint: str = "linf"
    fisher_weight: float = 1.0
    fisher_sequences: int = 32
    fisher_facts: int = 64
    fisher_labels: str = "sampled"

    def __post_init__(self) -> None:
        self.layers = check_layers("layers", self.layers)
        check_number("lr", self.lr)
        check_int("num_steps", self.num_steps, minimum=1)
        if self.norm_constraint is not None:
            check_number("norm_constraint (epsilon)", self.norm_constraint)
        if self.mode not in MODES:
            raise InvalidHparams(f"unknown FT mode {self.mode!r}; expected one of {MODES}")
        if self.params not in PARAMS:
            raise InvalidHparams(
                f"unknown part {self.params!r} to fine-tune; expected one of {PARAMS}"
            )
        if self.constraint not in CONSTRAINTS:
            raise InvalidHparams(
                f"unknown constraint {self.constraint!r}; expected one of {CONSTRAINTS}"
            )
        if self.mode == "constrained" and self.constraint == "linf" and not self.norm_constraint:
            raise InvalidHparams(
                "constrained fine-tuning with the linf constraint needs a norm_constraint (epsilon)"
            )
        check_int("batch_size", self.batch_size, minimum=1)
        check_number("mixed_ratio", self.mixed_ratio, allow_zero=True)
        check_number("weight_decay", self.weight_decay, allow_zero=True)
        check_number("fisher_weight", self.fisher_weight, allow_zero=True)
        check_int("fisher_sequences", self.fisher_sequences)
        check_int("fisher_facts", self.fisher_facts)
        if self.fisher_labels not in LABELS:
            raise InvalidHparams(
                f"fisher_labels must be one of {LABELS}, got {self.fisher_labels!r}"
            )
        if self.uses_fisher:
            try:
                self.fisher_settings()
            except InvalidInput as exc:
                raise InvalidHparams(str(exc)) from exc

    @property
    def uses_fisher(self) -> bool:
        """Whether a run with these settings adds the Fisher penalty."""
        return self.mode != "unconstrained" and self.constraint == "fisher"

    @property
    def epsilon(self) -> float | None:
        """The l-infinity bound a run applies (None: no projection)."""
        if self.mode == "unconstrained" or self.constraint != "linf":
            return None
        return self.norm_constraint

    def fisher_settings(self) -> FisherSettings:
        """The :class:`editing.statistics.fisher.FisherSettings` these hyper-parameters ask for."""
        return FisherSettings(
            n_sequences=self.fisher_sequences,
            n_facts=self.fisher_facts,
            labels=self.fisher_labels,
        )
