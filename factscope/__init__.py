"""factscope: locate facts in transformer language models and rewrite them.

Import packages: ``tracing`` (hooked models, facts, causal traces), ``editing`` (ROME, MEMIT,
constrained fine-tuning, evaluation) and ``viz`` (figures). This package holds the CLI.
"""

__version__ = "0.1.0"
