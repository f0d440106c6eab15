"""viz renders hand-built result values (no model): panels, colour floors, token labels,
difference data, hover text, saved files, and clear errors on mismatched input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from plotly.colors import get_colorscale  # noqa: E402

from tracing.results import (  # noqa: E402
    TOKEN_CLASSES,
    AverageEffects,
    LayerSelection,
    TraceResult,
    TraceSettings,
)
from viz import (  # noqa: E402
    EditBar,
    before_after_figure,
    edit_bars_figure,
    plot_average_effects,
    plot_average_heatmap,
    plot_before_after,
    plot_edit_bars,
    plot_layer_selection,
    plot_scaling,
    plot_trace,
    save_figure,
    token_labels,
    trace_figure,
    write_html,
)
from viz.interactive import hover_text  # noqa: E402
from viz.plots import to_edit_bars  # noqa: E402
from viz.style import CLASS_COLORS, CMAPS, KIND_STYLES, PLOTLY_SCALES, KindStyle  # noqa: E402

TOKENS = ["<bos>", "The", " Space", " Needle", " is", " located", " in", " the", " city", " of"]
N_LAYERS = 6


def make_trace(
    answer: str = " Seattle",
    seed: int = 0,
    tokens: list[str] | None = None,
    span: tuple[int, int] = (1, 4),
    n_layers: int = N_LAYERS,
    p_corrupted: float = 0.12,
) -> TraceResult:
    tokens = list(TOKENS if tokens is None else tokens)
    rng = np.random.default_rng(seed)
    scores = {k: rng.uniform(0.05, 0.9, (len(tokens), n_layers)) for k in ("resid", "mlp", "attn")}
    settings = TraceSettings(
        kinds=("resid", "mlp", "attn"),
        window={"resid": 1, "mlp": 10, "attn": 10},
        noise=0.1,
        noise_spec="3s",
        sigma=0.033,
        uniform_noise=False,
        samples=10,
        seed=seed,
        method="fast",
    )
    return TraceResult(
        prompt="".join(t for t in tokens if t != "<bos>"),
        subject="The Space Needle",
        answer=answer,
        answer_id=7,
        tokens=tokens,
        token_ids=list(range(len(tokens))),
        subject_span=span,
        p_clean=0.93,
        p_corrupted=p_corrupted,
        scores=scores,
        settings=settings,
    )


def heat_axes(fig):
    """Axes holding a heatmap image (colour-bar axes hold none)."""
    return [ax for ax in fig.axes if ax.images]


KINDS = ("resid", "mlp", "attn")
CMAP_NAMES = ("Purples", "Greens", "Reds")
EXPECTED_LABELS = ["<bos>", "The*", "Space*", "Needle*", "is", "located", "in", "the", "city", "of"]


# ---------------------------------------------------------------- static heatmaps


def test_plot_trace_panels_floor_labels_and_data():
    r = make_trace()
    fig = plot_trace(r)
    axes = heat_axes(fig)
    assert len(axes) == 3
    for ax, kind, cmap in zip(axes, KINDS, CMAP_NAMES, strict=True):
        im = ax.images[0]
        assert im.get_cmap().name == cmap
        assert im.norm.vmin == pytest.approx(r.p_corrupted)
        assert im.colorbar.ax.get_ylim()[0] == pytest.approx(r.p_corrupted)
        assert im.norm.vmax == pytest.approx(r.scores[kind].max())
        np.testing.assert_array_equal(np.asarray(im.get_array()), r.scores[kind])
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == EXPECTED_LABELS
    # tokens run top to bottom: row 0 (BOS) is drawn at the top
    assert axes[0].get_ylim()[0] > axes[0].get_ylim()[1]
    assert "Seattle" in fig._suptitle.get_text() and "0.930" in fig._suptitle.get_text()
    assert "MLP" in axes[1].get_title() and "window 10" in axes[1].get_title()


@pytest.mark.parametrize("kinds", [["mlp"], ["attn", "resid"], "attn"])
def test_plot_trace_one_panel_per_requested_kind(kinds):
    fig = plot_trace(make_trace(), kinds=kinds)
    wanted = [kinds] if isinstance(kinds, str) else kinds
    assert len(heat_axes(fig)) == len(wanted)
    cmaps = [ax.images[0].get_cmap().name for ax in heat_axes(fig)]
    assert cmaps == [dict(zip(KINDS, CMAP_NAMES, strict=True))[k] for k in wanted]


def test_one_colour_table_for_both_back_ends(monkeypatch):
    """matplotlib heatmaps, plotly heatmaps and layer-selection bars all read viz.style."""
    assert set(CLASS_COLORS) == set(TOKEN_CLASSES)
    assert CMAPS == PLOTLY_SCALES == dict(zip(KINDS, CMAP_NAMES, strict=True))
    monkeypatch.setitem(KIND_STYLES, "mlp", KindStyle("Oranges", "Blues", "#ff0000"))
    r = make_trace()
    assert heat_axes(plot_trace(r, kinds="mlp"))[0].images[0].get_cmap().name == "Oranges"
    scale = trace_figure(r, kinds="mlp").data[0].colorscale
    assert [c[1] for c in scale] == [c[1] for c in get_colorscale("Blues")]
    sel = LayerSelection([1], 1, "mlp", "last_subject", 0.3, [0.1, 0.3], n_facts=2)
    colour = plot_layer_selection(sel).axes[0].containers[0][1].get_facecolor()
    assert colour == pytest.approx((1.0, 0.0, 0.0, 1.0))


def test_token_labels_mark_exactly_the_subject_span():
    r = make_trace(tokens=["<bos>", "Paris", "\n", " ", " is"], span=(1, 2))
    assert token_labels(r) == ["<bos>", "Paris*", "\\n", "' '", "is"]
    r = make_trace(span=(8, 10))
    marked = [i for i, lab in enumerate(token_labels(r)) if lab.endswith("*")]
    assert marked == [8, 9]


def test_colour_floor_when_nothing_beats_corrupted():
    r = make_trace(p_corrupted=0.95)  # every score below the floor: still a valid, clipped scale
    im = heat_axes(plot_trace(r, kinds="mlp"))[0].images[0]
    assert im.norm.vmin == pytest.approx(0.95) and im.norm.vmax > 0.95


def test_plot_trace_bad_kind():
    with pytest.raises(ValueError, match="mlp_key"):
        plot_trace(make_trace(), kinds=["mlp_key"])


def test_save_figure_formats(tmp_path):
    fig = plot_trace(make_trace())
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for ext, head in magic.items():
        path = save_figure(fig, tmp_path / "sub" / f"trace.{ext}")
        data = path.read_bytes()
        assert data.startswith(head) and len(data) > 10_000
    with pytest.raises(ValueError, match="jpg"):
        save_figure(fig, tmp_path / "trace.jpg")


def test_png_dpi(tmp_path):
    from matplotlib.image import imread

    fig = plot_trace(make_trace(), kinds="mlp")
    img = imread(save_figure(fig, tmp_path / "a.png", dpi=100))
    img2 = imread(save_figure(fig, tmp_path / "b.png", dpi=200))
    assert img2.shape[1] == pytest.approx(2 * img.shape[1], rel=0.02)


def test_before_after_difference_panel():
    before, after = make_trace(seed=0), make_trace(answer=" Paris", seed=1)
    fig = plot_before_after(before, after, kind="mlp")
    axes = heat_axes(fig)
    assert len(axes) == 3
    diff = after.scores["mlp"] - before.scores["mlp"]
    np.testing.assert_allclose(np.asarray(axes[2].images[0].get_array()), diff, atol=0)
    norm = axes[2].images[0].norm
    assert norm.vmin == pytest.approx(-norm.vmax) and norm.vmax == pytest.approx(np.abs(diff).max())
    assert "Seattle" in axes[0].get_title() and "Paris" in axes[1].get_title()
    assert axes[0].images[0].norm.vmin == pytest.approx(before.p_corrupted)


@pytest.mark.parametrize(
    "after, match",
    [
        (make_trace(tokens=TOKENS[:-1] + [" town"]), "different prompts"),
        (make_trace(n_layers=N_LAYERS + 1), "shape"),
    ],
)
def test_before_after_mismatch(after, match):
    before = make_trace()
    with pytest.raises(ValueError, match=match):
        plot_before_after(before, after)
    with pytest.raises(ValueError, match=match):
        before_after_figure(before, after)


def test_before_after_missing_kind():
    after = make_trace()
    del after.scores["attn"]
    with pytest.raises(ValueError, match="attn"):
        plot_before_after(make_trace(), after, kind="attn")


# ---------------------------------------------------------------- plotly


def test_trace_figure_hover_and_html(tmp_path):
    r = make_trace()
    fig = trace_figure(r)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 3
    for t, kind, name in zip(heat, KINDS, CMAP_NAMES, strict=True):
        assert [c[1] for c in t.colorscale] == [c[1] for c in get_colorscale(name)]
        assert t.zmin == pytest.approx(r.p_corrupted)
        np.testing.assert_array_equal(np.asarray(t.z), r.scores[kind])
    assert list(fig.layout.yaxis.ticktext) == EXPECTED_LABELS
    p = r.scores["mlp"][3, 4]
    cell = heat[1].text[3][4]
    assert cell == (
        f"token: Needle*<br>layer: 4<br>p(Seattle): {p:.4f}"
        f"<br>indirect effect: {p - r.p_corrupted:+.4f}"
    )
    assert hover_text(r, "mlp")[3][4] == cell

    path = write_html(fig, tmp_path / "html" / "trace.html")
    html = path.read_text()
    assert len(html) > 1_000_000  # plotly.js embedded
    assert json.dumps(cell).replace("<", "\\u003c").replace(">", "\\u003e")[1:-1] in html
    assert not re.search(r"<script[^>]*\bsrc=", html), "HTML must not load scripts from a URL"


def test_before_after_figure_difference():
    before, after = make_trace(), make_trace(answer=" Paris", seed=3)
    fig = before_after_figure(before, after, kind="attn")
    assert len(fig.data) == 3
    np.testing.assert_allclose(
        np.asarray(fig.data[2].z), after.scores["attn"] - before.scores["attn"]
    )
    assert fig.data[2].zmid == 0.0
    assert "Seattle" in fig.layout.annotations[0].text
    assert "Paris" in fig.layout.annotations[1].text


# ---------------------------------------------------------------- line and bar plots


def make_effects() -> AverageEffects:
    rng = np.random.default_rng(0)
    effects = {k: {c: rng.random(N_LAYERS) for c in TOKEN_CLASSES} for k in ("resid", "mlp")}
    counts = {k: {c: 0 if c == "middle_subject" else 40 for c in TOKEN_CLASSES} for k in effects}
    return AverageEffects(effects, counts, n_facts=40, mean_p_clean=0.5, mean_p_corrupted=0.1)


def test_plot_average_effects(tmp_path):
    eff = make_effects()
    fig = plot_average_effects(eff)
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 2  # only the kinds present
    mlp = axes[1]
    lines = [ln for ln in mlp.get_lines() if ln.get_label().endswith(")")]
    assert len(lines) == len(TOKEN_CLASSES) - 1  # middle_subject has no facts
    by_label = {ln.get_label(): ln for ln in lines}
    np.testing.assert_array_equal(
        by_label["last subject token (n=40)"].get_ydata(), eff.effects["mlp"]["last_subject"]
    )
    assert len([ax for ax in plot_average_effects(eff, kinds=["mlp"]).axes if ax.get_lines()]) == 1
    assert save_figure(fig, tmp_path / "avg.pdf").stat().st_size > 5_000
    with pytest.raises(ValueError, match="attn"):
        plot_average_effects(eff, kinds=["attn"])


def test_plot_average_heatmap_rows_are_classes_with_facts():
    eff = make_effects()
    eff.settings = {"window": {"resid": 1, "mlp": 10}}
    fig = plot_average_heatmap(eff)
    axes = heat_axes(fig)
    assert len(axes) == 2  # only the kinds present
    present = [c for c in TOKEN_CLASSES if c != "middle_subject"]  # no facts: row left out
    for ax, kind in zip(axes, ("resid", "mlp"), strict=True):
        want = np.stack([eff.effects[kind][c] for c in present])
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), want)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels[1] == "last subject token (40)" and len(labels) == len(present)
    assert "window 10" in axes[1].get_xlabel() and "window" not in axes[0].get_xlabel()
    lo, hi = axes[1].get_images()[0].get_clim()
    assert lo == 0.0 and hi == pytest.approx(want.max())
    eff.effects["mlp"]["last"] = eff.effects["mlp"]["last"] - 1.0  # negative effects: floor < 0
    assert heat_axes(plot_average_heatmap(eff, kinds=["mlp"]))[0].get_images()[0].get_clim()[
        0
    ] == pytest.approx(eff.effects["mlp"]["last"].min())
    with pytest.raises(ValueError, match="attn"):
        plot_average_heatmap(eff, kinds=["attn"])


def test_plot_layer_selection(tmp_path):
    effect = [0.01, 0.02, 0.2, 0.3, 0.25, 0.05]
    sel = LayerSelection(
        layers=[2, 3, 4],
        k=3,
        kind="mlp",
        token_class="last_subject",
        window_score=0.75,
        per_layer_effect=effect,
        n_facts=40,
    )
    fig = plot_layer_selection(sel)
    ax = fig.axes[0]
    bars = ax.containers[0]
    assert [b.get_height() for b in bars] == pytest.approx(effect)
    colors = [b.get_facecolor() for b in bars]
    assert colors[2] == colors[3] == colors[4] != colors[1] == colors[5]
    (span,) = [p for p in ax.patches if p not in list(bars)]
    assert (span.get_x(), span.get_width()) == pytest.approx((1.5, 3.0))  # layers 2..4 shaded
    assert "2–4" in ax.get_title()
    assert save_figure(fig, tmp_path / "sel.png").stat().st_size > 5_000
    bad = LayerSelection(**{**sel.__dict__, "layers": [5, 6, 7]})
    with pytest.raises(ValueError, match="outside"):
        plot_layer_selection(bad)


EDIT_ROWS = [
    {"prompt_kind": "edit", "target": "true", "before": 0.8, "after": 0.05},
    {"prompt_kind": "edit", "target": "new", "before": 0.01, "after": 0.9},
    {"prompt_kind": "paraphrase", "target": "true", "before": 0.6, "after": 0.2},
    {"prompt_kind": "paraphrase", "target": "new", "before": 0.02, "after": 0.6},
    {"prompt_kind": "neighbourhood", "target": "true", "before": 0.5, "after": 0.45},
    EditBar("neighborhood", "new", 0.03, 0.08),
]


def test_plot_edit_bars(tmp_path):
    fig = plot_edit_bars(EDIT_ROWS, title="Space Needle -> Paris")
    ax = fig.axes[0]
    heights = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert heights["new target, after"] == pytest.approx([0.9, 0.6, 0.08])
    assert heights["true target, before"] == pytest.approx([0.8, 0.6, 0.5])
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "edit prompts",
        "paraphrase prompts",
        "neighborhood prompts",
    ]
    assert save_figure(fig, tmp_path / "bars.svg").stat().st_size > 5_000

    pfig = edit_bars_figure(EDIT_ROWS)
    by_name = {t.name: list(t.y) for t in pfig.data}
    assert by_name["new target, after"] == pytest.approx([0.9, 0.6, 0.08])
    assert write_html(pfig, tmp_path / "bars.html").stat().st_size > 1_000_000


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt_kind": "edit", "target": "true", "before": 0.5}, "row 0 lacks"),
        ({"prompt_kind": "rephrase", "target": "true", "before": 0.5, "after": 0.1}, "rephrase"),
        ({"prompt_kind": "edit", "target": "old", "before": 0.5, "after": 0.1}, "old"),
        ({"prompt_kind": "edit", "target": "new", "before": 1.5, "after": 0.1}, "probability"),
    ],
)
def test_plot_edit_bars_bad_rows(row, match):
    with pytest.raises(ValueError, match=match):
        plot_edit_bars([row])


def test_to_edit_bars_normalises_rows():
    bars = to_edit_bars(EDIT_ROWS)
    assert all(isinstance(b, EditBar) for b in bars) and len(bars) == len(EDIT_ROWS)
    assert bars[4] == EditBar("neighborhood", "true", 0.5, 0.45)  # "neighbourhood" accepted
    assert not hasattr(sys.modules["viz.plots"], "edit_bar_rows")  # renamed (clashed)
    with pytest.raises(ValueError, match="second row"):
        to_edit_bars([EDIT_ROWS[0], EDIT_ROWS[0]])


def test_plot_scaling(tmp_path):
    points = []
    for n in (1000, 1, 100, 10):  # unsorted on purpose
        for method, base in (("memit", 0.99), ("rome", 0.9), ("ft-l", 0.8)):
            points.append(
                {
                    "method": method,
                    "n_edits": n,
                    "efficacy": base - n / 1e4,
                    "paraphrase": base - 0.1,
                    "neighbourhood": 0.7,
                    "score": base - 0.2,
                }
            )
    points.append({"method": "none", "n_edits": 10, "efficacy": 0.02})
    fig = plot_scaling(points)
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert [ax.get_title() for ax in axes] == ["efficacy", "paraphrase", "neighborhood", "score"]
    eff_lines = {ln.get_label(): ln for ln in axes[0].get_lines()}
    assert set(eff_lines) == {"memit", "rome", "ft-l", "none"}
    assert list(eff_lines["memit"].get_xdata()) == [1, 10, 100, 1000]
    assert eff_lines["memit"].get_ydata() == pytest.approx(
        [0.99 - n / 1e4 for n in (1, 10, 100, 1000)]
    )
    assert list(eff_lines["none"].get_xdata()) == [10]
    assert len(axes[1].get_lines()) == 3  # "none" has no paraphrase value
    assert all(ax.get_xscale() == "log" for ax in axes)
    assert save_figure(fig, tmp_path / "scaling.png").stat().st_size > 10_000
    assert len([ax for ax in plot_scaling(points, metrics=["score"]).axes if ax.get_lines()]) == 1
    with pytest.raises(ValueError, match="n_edits"):
        plot_scaling([{"method": "rome", "efficacy": 1.0}])
    with pytest.raises(ValueError, match="no scaling points"):
        plot_scaling([])


def test_viz_does_not_import_torch():
    code = "import sys, viz; assert 'torch' not in sys.modules, 'viz imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sequential_plot_draws_each_run_against_edits():
    from tracing.errors import InvalidInput
    from viz.sequential import plot_sequential

    def row(n, es, ppl):
        return {
            "n_edits": n,
            "metrics": {"efficacy_success": es} if n else {},
            "perplexity": ppl,
            "known_accuracy": None,
        }

    runs = {
        "alphaedit": [row(0, None, 10.0), row(50, 1.0, 11.0), row(100, 0.9, 12.0)],
        "memit": [row(0, None, 10.0), row(50, 0.8, 15.0)],
    }
    fig = plot_sequential(runs)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["efficacy", "held-out perplexity"]  # panels without data left out
    eff = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(eff["alphaedit"].get_xdata()) == [50, 100]
    assert list(eff["alphaedit"].get_ydata()) == [1.0, 0.9]
    ppl = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[1].get_lines()}
    assert ppl == {"alphaedit": [10.0, 11.0, 12.0], "memit": [10.0, 15.0]}
    assert [ax.get_xlim()[0] for ax in fig.axes if ax.get_visible()] == [0, 0]  # one x axis
    with pytest.raises(InvalidInput):
        plot_sequential({})


def test_arrival_plot_follows_each_cohort():
    from tracing.errors import InvalidInput
    from viz.sequential import plot_arrival

    series = {
        "all": [(100, 0.9), (200, 0.7)],
        "arrived 1-100": [(200, 0.6), (100, 0.9)],  # drawn in order of edits
        "arrived 101-200": [(200, 0.8)],
        "arrived 201-300": [],  # not arrived: no line
    }
    fig = plot_arrival("efficacy_success", series)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert set(lines) == {"all", "arrived 1-100", "arrived 101-200"}
    assert list(lines["arrived 1-100"].get_xdata()) == [100, 200]
    assert list(lines["arrived 1-100"].get_ydata()) == [0.9, 0.6]
    assert lines["all"].get_linestyle() == "--"
    assert lines["arrived 101-200"].get_linestyle() == "-"
    with pytest.raises(InvalidInput):
        plot_arrival("efficacy_success", {"all": []})
