"""Figure helpers: they must work on the matplotlib that Colab has, without deprecation warnings."""
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dori_utils import plots


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
