"""PNG plots for the quality bench: recall@k curves, match vs best non-match scores, embedding maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench.quality import MODES, TOP_K, SetRun  # noqa: E402


def recall_curves(name: str, run: SetRun, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = np.arange(1, TOP_K + 1)
    for key in sorted(run.tallies, key=lambda k: k.order):
        if key.group == "all":
            ax.plot(
                ks,
                run.tallies[key].curve(TOP_K),
                marker="o",
                ms=3,
                label=key.label,
                linestyle="--" if key.filtered else "-",
            )
    ax.set(xlabel="k", ylabel="recall@k", title=f"{name}: recall@k", ylim=(0, 1.02), xticks=ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / f"{name}-recall.png")


def score_distributions(name: str, run: SetRun, out: Path) -> Path | None:
    """Cosine of the true match vs the best non-match per query: where a threshold would separate them."""
    panels = [k for k in run.tallies if k.group == "all" and not k.filtered and k.mode in ("image", "text")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], sorted(panels, key=lambda k: MODES.index(k.mode)), strict=True):
        outcomes = run.tallies[key].outcomes
        true = [o.true_score for o in outcomes if o.true_score is not None]
        other = [o.best_other for o in outcomes if o.best_other is not None]
        bins = np.linspace(min(true + other, default=0), max(true + other, default=1), 30)
        ax.hist(true, bins=bins, alpha=0.6, label=f"true match (n={len(true)})")
        ax.hist(other, bins=bins, alpha=0.6, label=f"best non-match (n={len(other)})")
        ax.set(title=f"{name}: {key.mode} cosine", xlabel="cosine", ylabel="queries")
        ax.legend(fontsize=8)
    return _save(fig, out / f"{name}-scores.png")


def embedding_map(name: str, run: SetRun, out: Path) -> Path | None:
    """The catalogue's vectors projected on their first two principal components, coloured by category."""
    if not run.embeddings:
        return None
    fig, axes = plt.subplots(1, len(run.embeddings), figsize=(6 * len(run.embeddings), 5), squeeze=False)
    for ax, (vector, (rows, labels)) in zip(axes[0], sorted(run.embeddings.items()), strict=True):
        centred = rows - rows.mean(axis=0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ components[:2].T
        roots = sorted({label.split(" > ")[0] for label in labels})
        colours = plt.get_cmap("tab10" if len(roots) <= 10 else "tab20")
        for i, root in enumerate(roots):
            mask = np.array([label.split(" > ")[0] == root for label in labels])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=14, color=colours(i % colours.N), label=root, alpha=0.8)
        ax.set(title=f"{name}: '{vector}' vectors, PCA", xticks=[], yticks=[])
        if len(roots) <= 12:
            ax.legend(fontsize=8)
    return _save(fig, out / f"{name}-map.png")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
