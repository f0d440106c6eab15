"""Causal tracing, the base every other package builds on.

:mod:`tracing.models` loads a model (offline) behind one architecture-neutral surface;
:mod:`tracing.trace` traces one fact (:func:`~tracing.trace.trace_fact`: the grid of
restored states, with the exact engines of :mod:`tracing.engine` and
:mod:`tracing.reference` or the attribution patching of :mod:`tracing.attribution`);
:mod:`tracing.localization` traces many facts, averages their effects and selects layers.
Devices, memory-aware batching and torchrun ranks live in :mod:`tracing.devices`,
:mod:`tracing.memory` and :mod:`tracing.distributed`.
"""
