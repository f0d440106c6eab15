"""Evaluating edits: CounterFact and zsRE tasks, their metrics, the runner and its results.

``evaluate(model, EvalConfig(...))`` (:mod:`editing.evaluation.runner`) edits cases with a
registered method and scores them; :func:`scaling` gives metric-against-number-of-edits
points; :func:`evaluate_sequential` (:mod:`editing.evaluation.sequential`) edits batch after
batch into one model and scores everything at checkpoints (:func:`arrival_table`: its edits
grouped by when they arrived); :class:`EvalSummary` and
:func:`comparison_table` read and tabulate results.
"""

from editing.evaluation.arrival import ArrivalTable, arrival_table
from editing.evaluation.config import EvalConfig
from editing.evaluation.generation import GenerationSettings
from editing.evaluation.results import EvalSummary, case_bars, comparison_table
from editing.evaluation.runner import evaluate
from editing.evaluation.scaling import scaling
from editing.evaluation.sequential import EditStream, SequentialConfig, evaluate_sequential
from editing.evaluation.tasks import TASKS, Case, Task, load_cases

__all__ = [
    "TASKS",
    "ArrivalTable",
    "Case",
    "EditStream",
    "EvalConfig",
    "EvalSummary",
    "GenerationSettings",
    "SequentialConfig",
    "Task",
    "arrival_table",
    "case_bars",
    "comparison_table",
    "evaluate",
    "evaluate_sequential",
    "load_cases",
    "scaling",
]
