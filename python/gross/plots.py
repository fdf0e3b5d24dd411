"""Matplotlib figures of a search: every configuration's accuracy against MACs (and latency), Pareto fronts, fine-tuned picks."""
import io

from gross_kernels.files import atomic_write

from gross.search import pareto_front


def pareto_plot(path, entries, rows, title="GroSS search"):
    """PNG at `path`: searched configurations (search-space val accuracy vs MACs), their Pareto front,
    and the fine-tuned uniform / searched configurations of `rows` (test accuracy mean ± std).

    When the entries carry predicted latency (a search with a latency table) a second panel shows
    the same against latency in ms; rows are placed there when they carry "latency_ms" too.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    axes = [("macs", 1e6, "MACs (millions)")]
    if entries and all(e.latency_ms is not None for e in entries):
        axes.append(("latency_ms", 1, "predicted latency (ms)"))
    fig, panels = plt.subplots(1, len(axes), figsize=(7 * len(axes), 4.5), dpi=120, squeeze=False)
    for ax, (cost, scale, label) in zip(panels[0], axes):
        _panel(ax, entries, [r for r in rows if cost in r], cost, scale)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def _panel(ax, entries, rows, cost, scale):
    """One panel: accuracy against `cost` (an Entry field and row key) divided by `scale`."""
    if entries:
        ax.scatter([getattr(e, cost) / scale for e in entries], [100 * e.accuracy for e in entries], s=10, c="0.65",
                   label="searched (series, val)")
        front = pareto_front(entries, cost)
        ax.step([getattr(e, cost) / scale for e in front], [100 * e.accuracy for e in front], where="post", c="0.3",
                lw=1, label="Pareto front (series, val)")
    styles = {"uniform": ("s", "tab:blue"), "searched": ("*", "tab:red")}
    for method, (marker, color) in styles.items():
        picked = [r for r in rows if r["method"] == method]
        if not picked:
            continue
        x = [r[cost] / scale for r in picked]
        ax.scatter(x, [100 * r["search_val_acc"] for r in picked], marker=marker, facecolors="none",
                   edgecolors=color, s=70, label=f"{method} (series, val)")
        ax.errorbar(x, [100 * r["test_acc_mean"] for r in picked], yerr=[100 * r["test_acc_std"] for r in picked],
                    fmt=marker, c=color, ms=9 if marker == "*" else 6, capsize=3,
                    label=f"{method} fine-tuned (test)")
        for r, xi in zip(picked, x):
            ax.annotate(str(r["budget"]), (xi, 100 * r["test_acc_mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
