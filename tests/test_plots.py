"""Figure helpers: they must work on the matplotlib that Colab has, without deprecation warnings."""
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dori_utils.book import plots


def test_horizontal_boxplot_lies_along_x_without_warnings():
    fig, ax = plt.subplots()
    values = [np.arange(10.0), np.arange(10.0) + 100]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = plots.horizontal_boxplot(ax, values, ["low", "high"])
    medians = [line.get_xdata()[0] for line in result["medians"]]
    assert medians == [4.5, 104.5]  # on the x axis: the boxes lie horizontally
    assert [t.get_text() for t in ax.get_yticklabels()] == ["low", "high"]
    plt.close(fig)


def test_pilot_map_counts_the_pilots_that_meet_the_targets():
    import pandas as pd

    table = pd.DataFrame({"MR": [1.0, 0.2, 1.0], "z-order share (median)": [0.5, np.nan, 0.08],
                          "z-order min": [0.2, np.nan, 0.05], "z-order max": [0.9, np.nan, 0.2],
                          "NeMo share (median)": [0.25, 0.2, 0.04]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.pilot_map(table)
    assert fig.axes[0].get_title().endswith("1 of 3 meet the targets")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][1] == "1: MR 0.2 (below the MR bar)"
    plt.close(fig)


def _shown_px(fig, text, column_px: float = 680) -> float:
    """A text's height in screen pixels where the book shrinks the figure to its column at 1280 px."""
    width_px = fig.get_size_inches()[0] * fig.dpi
    return text.get_fontsize() * fig.dpi / 72 * min(1.0, column_px / width_px)


def test_image_grid_labels_stay_readable_and_apart_however_many_columns():
    for n_cols in (3, 7, 9, 12):
        images = [[np.zeros((8, 8, 3)) for _ in range(n_cols)] for _ in range(2)]
        labels = ["training image", *(f"Wanda 10% + Dori seed {j}" for j in range(n_cols - 1))]
        fig = plots.image_grid(images, ["astronaut", "cat"], labels, captions=[["0.93"] * n_cols] * 2,
                               title="a title")
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
        assert min(_shown_px(fig, t) for t in texts) >= 9, n_cols
        renderer = fig.canvas.get_renderer()
        titles = sorted((ax.title.get_window_extent(renderer) for ax in fig.axes[:n_cols]), key=lambda b: b.x0)
        assert all(left.x1 <= right.x0 for left, right in zip(titles, titles[1:])), f"{n_cols} columns overlap"
        plt.close(fig)


def test_image_grid_captions_never_run_into_the_next_row():
    for n_cols, caption in ((7, "0.90"), (10, "0.47, rotated 90°"), (3, "stock photo: a gray brick wall")):
        images = [[np.zeros((8, 8, 3)) for _ in range(n_cols)] for _ in range(3)]
        fig = plots.image_grid(images, ["a", "b", "c"], [f"seed {j}" for j in range(n_cols)],
                               captions=[[caption] * n_cols] * 3, title="a title that is long enough to matter here")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = np.array(fig.axes).reshape(3, n_cols)
        for i in range(2):
            for j in range(n_cols):
                below = axes[i][j].xaxis.label.get_window_extent(renderer)
                assert axes[i + 1][j].get_window_extent(renderer).y1 <= below.y0 + 1, (n_cols, i, j)
        first_titles = [ax.title.get_window_extent(renderer) for ax in axes[0]]
        assert all(t.y1 <= fig._suptitle.get_window_extent(renderer).y0 + 1 for t in first_titles), n_cols
        plt.close(fig)
