"""Show results: a rich table on the terminal and a PNG of accuracy against mean steps."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from looplm.errors import LooplmError


def config_label(result: dict) -> str:
    if result["exit_policy"] == "last":
        return f"{result['steps']} steps"
    threshold = "" if result["exit_threshold"] is None else f" {result['exit_threshold']:g}"
    return f"{result['exit_policy']}{threshold} (<= {result['steps']})"


def results_table(results: dict) -> Table:
    metric = results.get("metric", "accuracy")
    table = Table(title=f"{results['task']}: {results['model']}")
    for name, justify in (("steps", "right"), ("exit policy", "left"), ("threshold", "right"),
                          (f"accuracy ({metric})", "right"), ("mean steps", "right"), ("n", "right")):
        table.add_column(name, justify=justify)
    for r in results["results"]:
        threshold = "" if r["exit_threshold"] is None else f"{r['exit_threshold']:g}"
        scored = r["n"] > 0  # an empty shard has no accuracy
        table.add_row(str(r["steps"]), r["exit_policy"], threshold, f"{100 * r['accuracy']:.1f}%" if scored else "-",
                      f"{r['mean_steps']:.2f}" if scored else "-", str(r["n"]))
    return table


def plot_results(results: dict, path: Path) -> Path:
    """Accuracy against mean steps: fixed depths as a line, each exit policy as labelled points."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LooplmError("the accuracy plot needs matplotlib; run: pip install matplotlib") from exc
    scored = [r for r in results["results"] if r["n"] > 0]
    fixed = sorted((r for r in scored if r["exit_policy"] == "last"), key=lambda r: r["steps"])
    policies = [r for r in scored if r["exit_policy"] != "last"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if fixed:
        ax.plot([r["mean_steps"] for r in fixed], [100 * r["accuracy"] for r in fixed], "o-", label="fixed depth")
    markers = "sD^v<>pPX*"
    for index, r in enumerate(policies):  # a legend entry each: labels next to points would overlap
        ax.scatter([r["mean_steps"]], [100 * r["accuracy"]], marker=markers[index % len(markers)],
                   label=config_label(r), zorder=3)
    ax.set_xlabel("mean steps (UT loops) per scored token")
    ax.set_ylabel(f"accuracy, % ({results.get('metric', 'accuracy')})")
    n = max((r["n"] for r in results["results"]), default=0)
    ax.set_title(f"{results['task']} (n={n}): {Path(str(results['model'])).name}", fontsize=9)
    ax.grid(alpha=0.3)
    if fixed or policies:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
