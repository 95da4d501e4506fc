"""A 2-D picture of an adaptation: anchors and catalogue vectors before and after the head, on each side's
first two principal components, coloured by the condition's label."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from retrieval.adapt.train import Examples, Transform

COLOURED = 10  # the labels with most anchors get a colour; the rest are grey
SAMPLE = 2_000


def plot_adaptation(examples: Examples, head: Transform, out: Path, *, title: str, names: dict[int, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    keep = rng.choice(len(examples), min(SAMPLE, len(examples)), replace=False) if len(examples) else np.zeros(0, int)
    anchors, labels = examples.anchors[keep], examples.labels[keep]
    top = [label for label, _ in Counter(labels.tolist()).most_common(COLOURED)]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, (side, transform) in zip(
        axes, (("before (raw vectors)", None), ("after (through the head)", head)), strict=True
    ):
        a = transform(anchors) if transform else anchors
        g = transform(examples.gallery) if transform else examples.gallery
        centre = np.vstack([a, g]).mean(axis=0)
        _, _, components = np.linalg.svd(np.vstack([a, g]) - centre, full_matrices=False)
        pa, pg = (a - centre) @ components[:2].T, (g - centre) @ components[:2].T
        grey_a = ~np.isin(labels, top)
        grey_g = ~np.isin(examples.gallery_labels, top)
        ax.scatter(pa[grey_a, 0], pa[grey_a, 1], s=4, color="0.85")
        ax.scatter(pg[grey_g, 0], pg[grey_g, 1], s=30, marker="*", color="0.7")
        for i, label in enumerate(top):
            colour = colours(i % 10)
            ax.scatter(*pa[labels == label].T, s=6, color=colour, alpha=0.6)
            mine = examples.gallery_labels == label
            ax.scatter(
                *pg[mine].T, s=160, marker="*", color=colour, edgecolor="black", label=names.get(label, str(label))
            )
        ax.set(title=side, xticks=[], yticks=[])
    axes[1].legend(fontsize=7, loc="best", title="label (star: catalogue)")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
