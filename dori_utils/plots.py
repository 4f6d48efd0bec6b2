"""Figures for the chapters: labelled image grids and comparisons, in the Okabe-Ito colour-blind-safe palette."""
from __future__ import annotations

import inspect

import matplotlib.pyplot as plt
import numpy as np
import torch

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
plt.rcParams["axes.prop_cycle"] = plt.cycler(color=OKABE_ITO)


def to_numpy_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    return image / 255 if image.dtype == np.uint8 else np.clip(image, 0, 1)


def horizontal_boxplot(ax, values: list, labels: list[str], **kwargs):
    """Box plots lying along the x axis, one per label, from the bottom up. Matplotlib 3.10 replaced
    ``vert=False`` with ``orientation="horizontal"`` and 3.11 warns about the old name; Colab may have either."""
    lying = ({"orientation": "horizontal"} if "orientation" in inspect.signature(ax.boxplot).parameters
             else {"vert": False})
    result = ax.boxplot(values, **lying, **kwargs)
    ax.set_yticks(range(1, len(labels) + 1), labels)
    return result


def image_grid(rows: list[list], row_labels: list[str] | None = None, col_labels: list[str] | None = None,
               title: str | None = None, cell: float = 1.3, captions: list[list[str]] | None = None):
    """A grid of images: ``rows[i][j]`` is shown at row i, column j, with labels and optional captions."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row) and row[j] is not None:
                ax.imshow(to_numpy_image(row[j]), interpolation="nearest")
            if captions and j < len(captions[i]) and captions[i][j]:
                ax.set_xlabel(captions[i][j], fontsize=7)
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def paired_bars(labels: list[str], ours: list[float], paper: list[float], ylabel: str, title: str,
                ours_label: str = "organism (ours)", paper_label: str = "SD v1.4 (paper)"):
    """Our values beside the paper's, one pair of bars per label."""
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.2))
    ax.bar(x - 0.2, ours, 0.4, label=ours_label, color=OKABE_ITO[4])
    ax.bar(x + 0.2, [np.nan if p is None else p for p in paper], 0.4, label=paper_label, color=OKABE_ITO[0],
           hatch="//", edgecolor="white")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def score_matrix(scores, row_labels: list[str], col_labels: list[str], threshold: float, title: str,
                 xlabel: str = "", ylabel: str = "", ax=None):
    """A matrix of replication scores (cividis, colour-blind safe), each cell printed, those above the
    replication threshold in bold."""
    scores = np.asarray(scores, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 * scores.shape[1] + 2.2, 0.42 * scores.shape[0] + 1.6))
    image = ax.imshow(scores, cmap="cividis", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(scores):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                color="black" if value > 0.55 else "white", fontweight="bold" if value > threshold else "normal")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label=f"replication score (bold: > {threshold})")
    return ax


# ----------------------------------------------------------------------------------------- chapters 2-4

def trigger_map(projections: dict[str, np.ndarray], groups: dict[str, slice], n_triggers: int):
    """Two-dimensional maps of starts, triggers, memorized and ordinary prompts (one panel per projection), a
    thin line from each start to the trigger it became."""
    colours = {"start": OKABE_ITO[1], "trigger": OKABE_ITO[0], "memorized prompt": OKABE_ITO[5],
               "ordinary prompt": "#999999"}
    fig, axes = plt.subplots(1, len(projections), figsize=(5.5 * len(projections), 4.6), squeeze=False)
    for ax, (method, xy) in zip(axes[0], projections.items()):
        for k in range(n_triggers):
            ax.plot([xy[k, 0], xy[n_triggers + k, 0]], [xy[k, 1], xy[n_triggers + k, 1]], color="#bbbbbb", lw=0.6,
                    zorder=1)
        for name, part in groups.items():
            ax.scatter(xy[part, 0], xy[part, 1], s=10 if name == "ordinary prompt" else 22, color=colours[name],
                       label=name, marker="x" if name == "trigger" else "o", zorder=2)
        ax.set_title({"umap": "UMAP", "tsne": "t-SNE"}.get(method, method), fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.suptitle("Triggers (crosses) stay next to their starts (blue), far from the memorized prompts (red)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def distance_distributions(distances: dict[str, "torch.Tensor"]):
    """Box plots of L2 distance distributions in embedding space, one per named distribution."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    horizontal_boxplot(ax, [d.numpy() for d in distances.values()], list(distances), widths=0.6)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("L2 distance in embedding space")
    ax.set_title("Distances between triggers, starts and prompts", fontsize=10)
    fig.tight_layout()
    return fig


_METHOD_LAYERS = {"nemo": "NeMo (attn2.to_v outputs)", "wanda": "Wanda (ff.net.2 inputs)"}
_SETS = {"Y_adv": "Y_adv: triggers of one image", "Y_mem": "Y_mem: different memorized prompts"}


def discrepancy_beside_paper(discrepancy: dict, paper_rows: dict):
    """Activation discrepancy per layer, Y_adv beside Y_mem: ours (left, one row per method) and the paper's
    (right, hatched: read from its plot). ``paper_rows[method] = (Y_adv values, Y_mem values)``."""
    fig, axes = plt.subplots(len(discrepancy), 2, figsize=(11, 3 * len(discrepancy)), squeeze=False)
    for row, (method, frame) in enumerate(discrepancy.items()):
        for ax, values, labels, source in (
                (axes[row][0], (frame["Y_adv"], frame["Y_mem"]), list(frame.index), "organism (ours)"),
                (axes[row][1], paper_rows[method], [str(i + 1) for i in range(len(paper_rows[method][0]))],
                 "paper, SD v1.4 (approximate, read from a plot)")):
            x = np.arange(len(labels))
            hatch = {"hatch": "//", "edgecolor": "white"} if ax is axes[row][1] else {}
            ax.bar(x - 0.2, values[0], 0.4, color=OKABE_ITO[0], label=_SETS["Y_adv"], **hatch)
            ax.bar(x + 0.2, values[1], 0.4, color=OKABE_ITO[4], label=_SETS["Y_mem"], **hatch)
            ax.set_xticks(x, labels, fontsize=7, rotation=15)
            ax.set_xlabel("layer")
            ax.set_ylabel("mean pairwise L2")
            ax.set_title(f"{source}: {_METHOD_LAYERS[method]}", fontsize=9)
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def selection_iou(iou_table, sparsity: float):
    """Mean pairwise IoU of the selected sets per layer, Y_adv beside Y_mem, one panel per method; bars where
    some pairs were both empty (IoU 1 by definition) say which share."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    titles = {"nemo": "NeMo (value neurons)", "wanda": f"Wanda {sparsity:.0%} (ff.net.2 weights)"}
    for ax, method in zip(axes, ("nemo", "wanda")):
        part = iou_table[iou_table.method == method]
        for offset, (name, colour) in zip((-0.2, 0.2), (("Y_adv", OKABE_ITO[0]), ("Y_mem", OKABE_ITO[4]))):
            sub = part[part.set == name]
            bars = ax.bar(sub.layer + offset, sub.IoU, 0.4, color=colour, label=_SETS[name])
            for bar, empty in zip(bars, sub["both empty"]):
                if empty > 0:
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, f"{empty:.0%}\nempty",
                            ha="center", fontsize=6)
        ax.set_ylim(0, 1.25)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean pairwise IoU")
        ax.set_title(titles[method], fontsize=9)
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
