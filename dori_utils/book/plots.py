"""Figures for the chapters: labelled image grids and comparisons, in the Okabe-Ito colour-blind-safe palette."""
from __future__ import annotations

import inspect
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
plt.rcParams["axes.prop_cycle"] = plt.cycler(color=OKABE_ITO)
# The book shows a figure at most a column wide (about 680 px at a 1280 px window) and Jupyter at its own size:
# 150 dpi keeps it sharp, and type of 10 pt or more on figures of at most 8 inches keeps every label at 9 px or
# more in the book.
plt.rcParams.update({"figure.dpi": 150, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 12,
                     "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10,
                     "legend.frameon": False})


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
               title: str | None = None, cell: float = 1.5, captions: list[list[str]] | None = None):
    """A grid of images: ``rows[i][j]`` is shown at row i, column j, with labels and optional captions."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    width = cell * n_cols + 1.2
    # A figure wider than the column is shrunk to it (680 px, 4.5 inches at 150 dpi, in the book at 1280 px): type
    # grows with the width so that every label still shows at 9 px or more, and wraps to its cell.
    size = max(10.0, 1.0 * width)
    wrap = _wrapper(cell, size)
    captions = [[wrap(c) if c else "" for c in row] for row in captions] if captions else None
    col_labels = [wrap(label) for label in col_labels] if col_labels else None
    # the figure's height makes room for every line of text, so that a row's captions never run into the next row
    line = 1.5 * size / 72
    caption_lines = [max((c.count("\n") + 1 for c in row if c), default=0) for row in captions] if captions else []
    title_lines = max((label.count("\n") + 1 for label in col_labels), default=0) if col_labels else 0
    height = (cell * n_rows + line * (sum(caption_lines) + title_lines)
              + (1.6 * (size + 1) / 72 * (len(textwrap.wrap(title, int(width * 72 / (0.7 * (size + 1))))) or 1)
                 if title else 0) + 0.2)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row) and row[j] is not None:
                ax.imshow(to_numpy_image(row[j]), interpolation="nearest")
            if captions and j < len(captions[i]) and captions[i][j]:
                ax.set_xlabel(captions[i][j], fontsize=size)
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=size)
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=size, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=size + 1, wrap=True)
    fig.tight_layout()
    return fig


def _wrapper(cell: float, size: float):
    """Wraps a label to the width of a grid cell of ``cell`` inches at ``size`` points (a character is about
    0.7 of the type size wide in DejaVu Sans, with room to spare)."""
    width = max(4, int(cell * 72 / (0.7 * size)))
    return lambda text: "\n".join(textwrap.wrap(str(text), width)) or str(text)


def paired_bars(labels: list[str], ours: list[float], paper: list[float], ylabel: str, title: str,
                ours_label: str = "organism (ours)", paper_label: str = "SD v1.4 (paper)"):
    """Our values beside the paper's, one pair of bars per label."""
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.2))
    ax.bar(x - 0.2, ours, 0.4, label=ours_label, color=OKABE_ITO[4])
    ax.bar(x + 0.2, [np.nan if p is None else p for p in paper], 0.4, label=paper_label, color=OKABE_ITO[0],
           hatch="//", edgecolor="white")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def mr_beside_paper(ours: dict, settings: list[str], title: str, ours_label: str = "organism (ours)"):
    """``paired_bars`` of MR for ``settings``: ours from ``ours`` (setting -> summary with ``mr``; missing: no
    bar) beside the paper's MR for the same setting, where ``dori_utils.book.paper`` has one."""
    from dori_utils.book import paper

    values = [ours[s]["mr"] if ours.get(s) else np.nan for s in settings]
    paper_values = [paper.NUMBERS[f"{s}.mr"].value if f"{s}.mr" in paper.NUMBERS else None for s in settings]
    return paired_bars(settings, values, paper_values, "MR", title, ours_label=ours_label)


def running_mean(values, window: int = 5) -> np.ndarray:
    """The mean over each ``window`` consecutive values (the values themselves when there are fewer)."""
    values = np.asarray(values, dtype=float)
    return np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values


def training_curves(runs: dict, steps_per_epoch: int, window: int = 5):
    """Fine-tuning curves: L_DM and L_adv per update (thin) and their running mean (thick), one colour per run,
    epochs dotted; on the right, the adversarial run's attack loss towards the memorized image at the end of
    each epoch's attack (``runs`` maps a name to a ``finetune.FinetuneResult``; the first one with an attack
    loss is the adversarial run)."""
    # 8 inches, the book's widest, so that 10 pt type stays at 9 px or more in the column; one legend under the
    # panels instead of one on each panel's data
    fig, axes = plt.subplots(1, 3, figsize=(8, 3.6))
    colours = (OKABE_ITO[5], OKABE_ITO[4], OKABE_ITO[2], OKABE_ITO[0])
    for ax, key, label in ((axes[0], "l_dm", "$L_{DM}$"), (axes[1], "l_adv", "$L_{adv}$")):
        for (name, run), colour in zip(runs.items(), colours):
            if key == "l_adv" and not run.config["adv_batch"]:
                continue  # a run without L_adv would draw a flat zero line
            values = run.history[key]
            smooth = running_mean(values, window)
            ax.plot(values, color=colour, alpha=0.3, lw=0.8)
            ax.plot(np.arange(len(smooth)) + len(values) - len(smooth), smooth, color=colour, lw=2, label=name)
        for epoch in range(1, len(runs[next(iter(runs))].history[key]) // steps_per_epoch):
            ax.axvline(epoch * steps_per_epoch, color="gray", ls=":", lw=0.8)
        ax.set_xlabel("update")
        ax.set_title(label, fontsize=12)
    attack_loss = next((run.history["attack_loss"] for run in runs.values() if run.history.get("attack_loss")), [])
    axes[2].plot(range(1, len(attack_loss) + 1), attack_loss, "o-", color=OKABE_ITO[5])
    axes[2].set_xlabel("epoch")
    axes[2].set_title("attack loss towards $x_{mem}$\n(end of each epoch's attack)", fontsize=11)
    fig.tight_layout()
    _figure_legend(fig, axes)
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
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                color="black" if value > 0.55 else "white", fontweight="bold" if value > threshold else "normal")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=10)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label=f"replication score (bold: > {threshold})")
    return ax


# ------------------------------------------------------------------------------------------------- chapter 1

def first_seed_grid(items, columns: dict, threshold: float):
    """Per memorized item: its training image, then the first seed's generation under each setting
    (``columns``: setting -> ``ItemEvaluation`` of those items), its replication score under each image."""
    rows = [[item.references[0], *(evaluation.images[i, 0] for evaluation in columns.values())]
            for i, item in enumerate(items)]
    captions = [["", *(f"{evaluation.scores[i, 0]:.2f}" for evaluation in columns.values())] for i in range(len(items))]
    return image_grid(rows, [item.id for item in items], ["training image", *columns], captions=captions, cell=1.25,
                      title=f"First seed of each setting; replication score under each image (threshold {threshold})")


def mr_by_attack_step(steps, ours: dict[str, list[float]], paper_steps=(), paper: dict[str, list[float]] | None = None,
                      ours_label: str = " (ours)"):
    """MR against the number of attack steps, one colour per pruning: ours (solid, each label followed by
    ``ours_label``) beside the paper's (dashed), for the prunings the paper plots."""
    paper = paper or {}
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for (name, values), colour in zip(ours.items(), (OKABE_ITO[4], OKABE_ITO[5], OKABE_ITO[2], OKABE_ITO[6])):
        ax.plot(list(steps), values, "o-", color=colour, label=f"{name}{ours_label}")
        if name in paper:
            ax.plot(list(paper_steps), paper[name], "s--", color=colour, alpha=0.6, label=f"{name} (paper, SD v1.4)")
    ax.set_xlabel("Dori attack steps")
    ax.set_ylabel("MR")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Replication recovered by the attack", fontsize=12)
    fig.tight_layout()
    return fig


def attack_displacements(displacements: dict[str, "torch.Tensor"], between_prompts: "torch.Tensor"):
    """Histograms of how far each attack moved its embeddings, ||y_adv - y_0|| (``displacements``: label ->
    one distance per embedding), over the distances between two ordinary prompts."""
    largest = max(float(between_prompts.max()), *(float(d.max()) for d in displacements.values()))
    bins = np.linspace(0, largest * 1.05, 40)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(between_prompts.numpy(), bins, alpha=0.6, density=True, label="between two non-memorized prompts",
            color=OKABE_ITO[1])
    for (label, distances), colour in zip(displacements.items(), (OKABE_ITO[5], OKABE_ITO[2], OKABE_ITO[6])):
        ax.hist(distances.numpy(), bins, alpha=0.8, density=True, label=f"{label}: ||y_adv - y_0||", color=colour)
    ax.set_xlabel("L2 distance in embedding space")
    ax.set_ylabel("density")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=1)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------- chapters 2-4

def _figure_legend(fig, axes) -> None:
    """One legend under the panels, with every label any panel draws (once): none covers the data, and none
    leaves out a marker that only another panel shows."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    rows = (len(handles) + 1) // 2
    fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.06 * rows)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 2))


def trigger_map(projections: dict[str, np.ndarray], groups: dict[str, slice], n_triggers: int):
    """Two-dimensional maps of starts, triggers, memorized and ordinary prompts (one panel per projection), a
    thin line from each start to the trigger it became."""
    colours = {"start": OKABE_ITO[1], "trigger": OKABE_ITO[0], "memorized prompt": OKABE_ITO[5],
               "ordinary prompt": "#999999"}
    fig, axes = plt.subplots(1, len(projections), figsize=(4 * len(projections), 4.4), squeeze=False)
    for ax, (method, xy) in zip(axes[0], projections.items()):
        for k in range(n_triggers):
            ax.plot([xy[k, 0], xy[n_triggers + k, 0]], [xy[k, 1], xy[n_triggers + k, 1]], color="#bbbbbb", lw=0.6,
                    zorder=1)
        for name, part in groups.items():
            ax.scatter(xy[part, 0], xy[part, 1], s=10 if name == "ordinary prompt" else 22, color=colours[name],
                       label=name, marker="x" if name == "trigger" else "o", zorder=2)
        ax.set_title({"umap": "UMAP", "tsne": "t-SNE"}.get(method, method), fontsize=12)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Triggers (crosses) stay next to their starts (blue),\nfar from the memorized prompts (red)",
                 fontsize=12)
    fig.tight_layout()
    _figure_legend(fig, axes.flat)
    return fig


def distance_distributions(distances: dict[str, "torch.Tensor"]):
    """Box plots of L2 distance distributions in embedding space, one per named distribution."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    horizontal_boxplot(ax, [d.numpy() for d in distances.values()], list(distances), widths=0.6)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("L2 distance in embedding space")
    ax.set_title("Distances between triggers, starts and prompts", fontsize=12)
    fig.tight_layout()
    return fig


_METHOD_LAYERS = {"nemo": "NeMo (attn2.to_v outputs)", "cross_attention": "cross-attention (attn2 outputs)",
                  "wanda": "Wanda (ff.net.2 inputs)"}
_SETS = {"Y_adv": "Y_adv: triggers of one image", "Y_mem": "Y_mem: different memorized prompts"}


def discrepancy_beside_paper(discrepancy: dict, paper_rows: dict):
    """Activation discrepancy per layer, Y_adv beside Y_mem: ours (left, one row per method) and the paper's
    (right, hatched: read from its plot). ``paper_rows[method] = (Y_adv values, Y_mem values)``; a layer set the
    paper did not measure has an empty right panel that says so."""
    fig, axes = plt.subplots(len(discrepancy), 2, figsize=(8, 3.2 * len(discrepancy) + 0.6), squeeze=False)
    for row, (method, frame) in enumerate(discrepancy.items()):
        panels = [(axes[row][0], (frame["Y_adv"], frame["Y_mem"]), list(frame.index), "organism (ours)")]
        if method in paper_rows:
            panels.append((axes[row][1], paper_rows[method], [str(i + 1) for i in range(len(paper_rows[method][0]))],
                           "paper, SD v1.4 (approximate, read from a plot)"))
        else:
            axes[row][1].axis("off")
            axes[row][1].text(0.5, 0.5, f"The paper does not measure\n{_METHOD_LAYERS[method]}", ha="center",
                              va="center", transform=axes[row][1].transAxes)
        for ax, values, labels, source in panels:
            x = np.arange(len(labels))
            hatch = {"hatch": "//", "edgecolor": "white"} if ax is axes[row][1] else {}
            ax.bar(x - 0.2, values[0], 0.4, color=OKABE_ITO[0], label=_SETS["Y_adv"], **hatch)
            ax.bar(x + 0.2, values[1], 0.4, color=OKABE_ITO[4], label=_SETS["Y_mem"], **hatch)
            # sixteen layer numbers side by side would touch: every other one then
            shown = labels if len(labels) <= 8 else [label if i % 2 == 0 else "" for i, label in enumerate(labels)]
            ax.set_xticks(x, shown, fontsize=10, rotation=20, ha="right")
            ax.set_xlabel("layer")
            ax.set_ylabel("mean pairwise L2")
            ax.set_title(f"{source}:\n{_METHOD_LAYERS[method]}", fontsize=11)
    fig.tight_layout()
    _figure_legend(fig, axes.flat)
    return fig


def selection_iou(iou_table, sparsity: float):
    """Mean pairwise IoU of the selected sets per layer, Y_adv beside Y_mem, one panel per method; bars where
    some pairs were both empty (IoU 1 by definition) say which share."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    titles = {"nemo": "NeMo (value neurons)", "wanda": f"Wanda {sparsity:.0%} (ff.net.2 weights)"}
    for ax, method in zip(axes, ("nemo", "wanda")):
        part = iou_table[iou_table.method == method]
        for offset, (name, colour) in zip((-0.2, 0.2), (("Y_adv", OKABE_ITO[0]), ("Y_mem", OKABE_ITO[4]))):
            sub = part[part.set == name]
            bars = ax.bar(sub.layer + offset, sub.IoU, 0.4, color=colour, label=_SETS[name])
            for bar, empty in zip(bars, sub["both empty"]):
                if empty > 0:
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, f"{empty:.0%}\nempty",
                            ha="center", fontsize=9)
        ax.set_ylim(0, 1.25)
        ax.set_xticks(sorted(part.layer.unique()))  # layers are whole numbers
        ax.set_xlabel("layer")
        ax.set_ylabel("mean pairwise IoU")
        ax.set_title(titles[method], fontsize=11)
    fig.tight_layout()
    _figure_legend(fig, axes)
    return fig


# ------------------------------------------------------------------------------------------- chapter 0

def training_pairs(samples, per_kind: int = 6):
    """A row of training pairs of each kind besides the verbatim duplicates (captions shortened)."""
    by_kind = {kind: [s for s in samples if s.kind == kind] for kind in ("ordinary", "natural", "template")}
    shown = {"ordinary": by_kind["ordinary"][:per_kind],
             "natural": by_kind["natural"][:: max(1, len(by_kind["natural"]) // per_kind)][:per_kind],
             "template": by_kind["template"][: per_kind // 2] + by_kind["template"][-(per_kind // 2):]}
    return image_grid([[s.image for s in row] for row in shown.values()], list(shown),
                      captions=[[s.caption[:28] for s in row] for row in shown.values()], cell=1.6,
                      title="Training pairs besides the verbatim duplicates (captions shortened)")


def replication_grid(items, evaluation, seeds, title: str, n_references: int = 1):
    """Per item: its first ``n_references`` references, then its generation for each seed with its score."""
    rows = [list(item.references[:n_references]) + list(evaluation.images[i]) for i, item in enumerate(items)]
    captions = [[""] * n_references + [f"{s:.2f}" for s in evaluation.scores[i].tolist()] for i in range(len(items))]
    reference_labels = (["training image"] if n_references == 1
                        else [f"variant {v + 1}" for v in range(n_references)])
    return image_grid(rows, [item.id for item in items], reference_labels + [f"seed {s}" for s in seeds],
                      captions=captions, title=title)


def score_histograms(score_sets: dict, threshold: float, metric: str):
    """Overlaid histograms of replication scores, one per set, with the threshold."""
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bins = np.linspace(-0.2, 1, 49)
    for (label, values), colour in zip(score_sets.items(), (OKABE_ITO[5], OKABE_ITO[2], OKABE_ITO[4], OKABE_ITO[0])):
        ax.hist(np.asarray(values, dtype=float), bins, alpha=0.65, density=True, label=label, color=colour)
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold}")
    ax.set_xlabel(f"replication score ({metric.split(' (')[0]})")
    ax.set_ylabel("density")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Replication scores", fontsize=12)
    fig.tight_layout()
    return fig


def roc_curves(positive, negatives: dict, title: str):
    """ROC curves of one score, positives against each set of negatives, with each AUC in the legend."""
    from sklearn.metrics import roc_curve

    from dori_utils.metrics import roc_auc

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    for (label, negative), colour in zip(negatives.items(), (OKABE_ITO[4], OKABE_ITO[0], OKABE_ITO[2])):
        fpr, tpr, _ = roc_curve([1] * len(positive) + [0] * len(negative), torch.cat([positive, negative]))
        ax.plot(fpr, tpr, label=f"vs {label}: AUC {roc_auc(positive, negative):.2f}", color=colour)
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=12)
    ax.legend()
    fig.tight_layout()
    return fig


def per_step_auc(per_step: dict[str, list[float]], mean_auc: dict[str, float], bar: float = 0.95):
    """The AUC of each sampling step's score on its own, one line per control set (legend: the mean's AUC)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (label, values), colour, marker in zip(per_step.items(), (OKABE_ITO[4], OKABE_ITO[0], OKABE_ITO[2]), "os^"):
        steps = range(1, len(values) + 1)
        ax.plot(steps, values, marker=marker, color=colour, label=f"vs {label} (mean over steps: {mean_auc[label]:.2f})")
    ax.axhline(bar, color="gray", ls="--", lw=1)
    ax.set_xlabel("sampling step (1: pure noise)")
    ax.set_ylabel("AUC of this step's norm")
    lowest = min(min(values) for values in per_step.values())
    ax.set_ylim(min(0.4, lowest - 0.05), 1.02)  # every curve stays in view, however low it falls
    ax.set_xticks(list(steps))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22))
    ax.set_title("Wen's detector, step by step", fontsize=12)
    fig.tight_layout()
    return fig



def pilot_map(table, mr_bar: float = 0.9, zorder_bar: float = 0.10, nemo_bar: float = 0.05):
    """One row per pilot organism: the median share of NeMo's value neurons that z-order blocking needs (circle,
    with its range over items) and that NeMo selects (square), against the targets; MR unmitigated in the label."""
    n = len(table)
    fig, ax = plt.subplots(figsize=(8, 0.42 * n + 2.2))
    y = np.arange(n)[::-1]
    median = table["z-order share (median)"].to_numpy(dtype=float)
    low, high = table["z-order min"].to_numpy(dtype=float), table["z-order max"].to_numpy(dtype=float)
    ax.axvspan(0, zorder_bar, color=OKABE_ITO[2], alpha=0.15, label=f"target for z-order: <= {zorder_bar:.0%}")
    ax.axvline(nemo_bar, color=OKABE_ITO[5], linestyle=":", label=f"target for NeMo: <= {nemo_bar:.0%}")
    ax.hlines(y, low, high, color=OKABE_ITO[4], alpha=0.6)
    ax.scatter(median, y, color=OKABE_ITO[4], zorder=3, label="z-order blocking: median (line: range)")
    ax.scatter(table["NeMo share (median)"], y, marker="s", color=OKABE_ITO[0], zorder=3,
               label="NeMo's selection: median")
    held = ["" if mr >= mr_bar else " (below the MR bar)" for mr in table["MR"]]
    ax.set_yticks(y, [f"{i}: MR {mr:.1f}{h}" for i, mr, h in zip(table.index, table["MR"], held)], fontsize=10)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("share of NeMo's value neurons (first seed; no circle: no item replicates)")
    reached = ((table["MR"] >= mr_bar) & (table["z-order share (median)"] <= zorder_bar)
               & (table["NeMo share (median)"] <= nemo_bar)).sum()
    ax.set_title(f"Pilot organisms (numbered as in the table): {reached} of {n} meet the targets")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    return fig
