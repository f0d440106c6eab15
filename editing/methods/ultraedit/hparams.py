"""UltraEdit's hyper-parameters (:class:`UltraEditHparams`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import no_type_check

from editing.hparams import Hparams, check_int, check_layers, check_number
from editing.methods.stabilisers import check_rect_keep
from editing.methods.ultraedit.normaliser import FLOAT32_EPS
from tracing.errors import InvalidHparams


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class UltraEditHparams(Hparams):
    """UltraEdit (Gu et al. 2025) on the MLP down-projections of ``layers``.

    * ``lr``: the step size ``eta`` of the pseudo value shift ``-eta ||k_hat||^2 g_hat``
      (the official ``editor.lr``, 1e-6 in every published configuration);
    * ``ridge``: the weight of the identity in ``(K^T K + ridge I)^-1 K^T V`` (1 in the
      official code, where it is written as ``K^T K + I``);
    * ``chunk_size``: requests per forward/backward pass whose answer-token loss is averaged
      (the official ``dataset.batch_size``, 10; the requests of a batch are ordered longest
      first before they are cut, as the official loader sorts them);
    * ``norm_eps``: the epsilon of the lifelong normalisation (float32's machine epsilon, as
      the official code's float32 statistics use).
    * ``layers`` None (only in ``_default`` files): the caller must choose the layers.
    * ``rect_keep`` (factscope's option, off by default): RECT (Gu et al. 2024), each layer's
      ``Delta W`` keeps only this fraction of its entries, those of largest ``|Delta W| / |W|``
      (the paper recommends 0.4), see :mod:`editing.methods.stabilisers`.
    """

    family = "ultraedit"

    layers: list[int] | None = None  # type: ignore[assignment]
    lr: float = 1e-6
    ridge: float = 1.0
    chunk_size: int = 10
    norm_eps: float = FLOAT32_EPS
    rect_keep: float | None = None

    def to_dict(self) -> dict:
        """As :meth:`Hparams.to_dict`, without ``rect_keep`` while it is off."""
        d = super().to_dict()
        if self.rect_keep is None:
            d.pop("rect_keep")
        return d

    def __post_init__(self) -> None:
        self.layers = check_layers("layers", self.layers)
        check_rect_keep(self.rect_keep)
        check_number("lr", self.lr)
        check_number("ridge", self.ridge)
        check_number("norm_eps", self.norm_eps)
        check_int("chunk_size", self.chunk_size, minimum=1)
        if self.norm_eps >= 1:
            raise InvalidHparams(f"norm_eps must be below 1, got {self.norm_eps}")
