"""Keys and their statistics: what the editing methods know about a layer's inputs.

* :mod:`editing.statistics.corpus`: the text the statistics are read from (Wikitext);
* :mod:`editing.statistics.stats`: second moments ``C = E[k k^T]`` of a layer's MLP keys over
  that text, accumulated in float64 and cached on disk;
* :mod:`editing.statistics.keys`: the key ``k*`` of a subject and the per-layer statistics the
  methods ask for;
* :mod:`editing.statistics.nullspace`: AlphaEdit's projector onto the null space of ``C``;
* :mod:`editing.statistics.known_keys`: the subject keys of facts the model knows, mixed into
  ``C`` for AlphaEdit's knowledge-aware null space (``knowledge_share``, off by default);
* :mod:`editing.statistics.fisher`: the diagonal Fisher information that constrained
  fine-tuning penalises.

Depends on :mod:`editing.requests`, :mod:`editing.edits` and :mod:`editing.hparams`, never on
the methods.
"""
