"""The one colour table of :mod:`viz`, shared by the matplotlib and plotly back ends.

Per kind of traced state (resid, mlp, attn) a :class:`KindStyle` holds the matplotlib colour
map, the plotly colour scale and the line/bar colour, as in Meng et al. 2022: residual stream
purple, MLP green, attention red. Also here: the diverging map of difference panels, the bar
colours of the true and new targets, and the line colours of the token classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure


@dataclass(frozen=True)
class KindStyle:
    """Colours of one kind: ``cmap`` (matplotlib colour-map name), ``colorscale`` (plotly
    colour-scale name) and ``line`` (a single colour for lines and bars)."""

    cmap: str
    colorscale: str
    line: str


#: Colours per kind, as in the paper: residual purple, MLP green, attention red.
KIND_STYLES: dict[str, KindStyle] = {
    "resid": KindStyle(cmap="Purples", colorscale="Purples", line="#6a51a3"),
    "mlp": KindStyle(cmap="Greens", colorscale="Greens", line="#238b45"),
    "attn": KindStyle(cmap="Reds", colorscale="Reds", line="#cb181d"),
}
#: Colours of a kind not in :data:`KIND_STYLES`.
DEFAULT_KIND_STYLE = KindStyle(cmap="viridis", colorscale="Viridis", line="#238b45")

#: Diverging map, centred on 0, of ``after - before`` panels (matplotlib and plotly name).
DIFF_CMAP = "RdBu_r"
#: Bar colour per target of an edit: the true (old) object and the new one.
BAR_COLORS: dict[str, str] = {"true": "#1f77b4", "new": "#ff7f0e"}
#: Bar colour of layers outside a chosen window (matplotlib grey level).
UNCHOSEN_COLOR = "0.7"
#: Line colour per token class of ROME Fig. 2 (keys: ``tracing.results.TOKEN_CLASSES``).
CLASS_COLORS: dict[str, str] = {
    "first_subject": "#9ecae1",
    "middle_subject": "#4292c6",
    "last_subject": "#d62728",
    "first_subsequent": "#ff7f0e",
    "further": "#2ca02c",
    "last": "#111111",
}


def kind_style(kind: str) -> KindStyle:
    """The colours of ``kind``; :data:`DEFAULT_KIND_STYLE` for a kind without its own."""
    return KIND_STYLES.get(kind, DEFAULT_KIND_STYLE)


#: matplotlib colour map per kind (derived from :data:`KIND_STYLES`).
CMAPS: dict[str, str] = {k: s.cmap for k, s in KIND_STYLES.items()}
#: plotly colour scale per kind (derived from :data:`KIND_STYLES`).
PLOTLY_SCALES: dict[str, str] = {k: s.colorscale for k, s in KIND_STYLES.items()}
#: Line colour per kind (derived from :data:`KIND_STYLES`).
KIND_COLORS: dict[str, str] = {k: s.line for k, s in KIND_STYLES.items()}


def root_figure(ax: Axes) -> Figure:
    """The top-level figure an axes belongs to (also when it sits in a sub-figure)."""
    fig = ax.get_figure(root=True)
    if not isinstance(fig, Figure):
        raise TypeError("these axes belong to no figure")
    return fig
