"""Fine-tuning for fact editing (Zhu et al. 2020, "Modifying Memories in Transformer
Models"): constrained fine-tuning, plain fine-tuning (FT) and mixed batches, of the MLP
down-projection only (what ROME's papers call FT-L) or of whole parts of chosen blocks.

:func:`finetune_edit` fine-tunes the tensors ``hp.params`` (``down_proj``, ``mlp``, ``attn``
or ``block``; :mod:`editing.params` names them on every architecture) of the blocks
``hp.layers`` to maximise the teacher-forced log-probability of each request's
``target_new`` after its prompt, with Adam. The paper's settings:

* mode ``"constrained"`` with ``constraint="linf"``: after every optimiser step each tuned
  number is projected back into ``θ0 ± ε`` (``hp.norm_constraint``);
* mode ``"constrained"`` with ``constraint="fisher"``: the loss gains
  ``λ Σ_i F_i (θ_i − θ0_i)²`` with ``F`` the diagonal Fisher information on text the model
  already handles (:mod:`editing.statistics.fisher`; ``λ = hp.fisher_weight``);
* ``"unconstrained"`` (FT): no constraint;
* ``"mixed"``: every batch of new facts also holds ``hp.mixed_ratio`` unmodified facts per
  new fact (prompts with the answers the model already gives), so the model is trained to
  keep them; the chosen constraint also applies (linf when ``norm_constraint`` is set).

The model's weights are left exactly as they were: the result is an
:class:`editing.edits.edit.Edit` holding the dense change of every tuned tensor (apply it
yourself).

Modules: :mod:`.hparams` (the hyper-parameters), :mod:`.batches` (examples, mixed batches,
the fast loss), :mod:`.train` (the run).
"""

from editing.methods.finetune.batches import default_neutral_facts, mixed_schedule
from editing.methods.finetune.hparams import (
    CONSTRAINTS,
    METHOD_NAMES,
    MODES,
    PARAMS,
    FTHparams,
)
from editing.methods.finetune.train import METHODS, finetune_edit, tuned_parameters

__all__ = [
    "CONSTRAINTS",
    "METHODS",
    "METHOD_NAMES",
    "MODES",
    "PARAMS",
    "FTHparams",
    "default_neutral_facts",
    "finetune_edit",
    "mixed_schedule",
    "tuned_parameters",
]
