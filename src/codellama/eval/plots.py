"""PNG plots of eval results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sweep(rows: list[dict], path: Path, title: str) -> str | None:
    """pass@k against temperature, one line per k (the paper's Fig. 6)."""
    plt = _plt()
    if plt is None:
        return None
    keys = sorted({k for r in rows for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in keys:
        pts = [(r["temperature"], 100 * r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    ax.set_xlabel("temperature")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_heatmap(table: dict[tuple[int, float], float], path: Path, title: str) -> str | None:
    """Accuracy per (context length, key position) as a heat map (the paper's Tab. 17 as a picture)."""
    plt = _plt()
    if plt is None:
        return None
    lengths = sorted({k[0] for k in table})
    positions = sorted({k[1] for k in table})
    grid = [[100 * table.get((n, p), float("nan")) for n in lengths] for p in positions]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(positions) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(positions)), [f"{p:g}" for p in positions])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key position")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy %")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_curve(xs: list[float], ys: list[float], path: Path, title: str, xlabel: str, ylabel: str) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
