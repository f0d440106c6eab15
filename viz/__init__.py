"""Pictures of factscope results: paper-style heatmaps (matplotlib), interactive heatmaps
(plotly) and line / bar / scaling / layer-sweep plots. ``viz`` only renders result values;
it never runs a model."""

from viz.heatmap import (
    plot_average_heatmap,
    plot_before_after,
    plot_trace,
    save_figure,
)
from viz.interactive import before_after_figure, edit_bars_figure, trace_figure, write_html
from viz.labels import token_labels
from viz.layer_sweep import plot_layer_sweep
from viz.plots import (
    EditBar,
    plot_average_effects,
    plot_edit_bars,
    plot_layer_selection,
    plot_scaling,
)
from viz.sequential import plot_arrival, plot_sequential

__all__ = [
    "EditBar",
    "before_after_figure",
    "edit_bars_figure",
    "plot_arrival",
    "plot_average_effects",
    "plot_average_heatmap",
    "plot_before_after",
    "plot_edit_bars",
    "plot_layer_selection",
    "plot_layer_sweep",
    "plot_scaling",
    "plot_sequential",
    "plot_trace",
    "save_figure",
    "token_labels",
    "trace_figure",
    "write_html",
]
