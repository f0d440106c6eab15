"""The ``Edit`` value and what it touches: deltas, their disk format, the weights, export.

* :mod:`editing.edits.layer_delta`: :class:`~editing.edits.layer_delta.LayerDelta`, one
  tensor's change;
* :mod:`editing.edits.edit`: :class:`~editing.edits.edit.Edit`, the deltas of some requests
  with what made them (apply, undo, save, load, export);
* :mod:`editing.edits.format`: an edit on disk (``deltas.safetensors`` + ``edit.json``);
* :mod:`editing.edits.weights`: snapshots, bit-exact restores and digests of block weights;
* :mod:`editing.edits.export`: an edited model as a plain Hugging Face folder.

Depends on :mod:`editing.requests` and :mod:`editing.params` only; ``edit`` uses ``format``,
never the other way.
"""
