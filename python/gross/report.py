"""The headline report: per budget, uniform vs searched configuration over n fine-tuning runs, and whether their
difference exceeds its spread; written as table.md, results.csv, results.json and pareto.png."""
import csv
import io
import math
import os
import statistics

from gross_kernels.files import atomic_write, atomic_write_json

from gross.config import config_string


def row(budget, method, config, macs, search_acc, results):
    """One table row from a configuration's fine-tuning results (dicts with test_acc and, for run 0, exported)."""
    accs = [r["test_acc"] for r in results]
    return {"budget": budget, "method": method, "config": config, "macs": macs, "search_val_acc": search_acc,
            "test_acc_mean": statistics.fmean(accs), "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_accs": accs, "exported": results[0]["exported"]}


def compare(uniform, searched):
    """Searched − uniform mean test accuracy, its spread (2 standard errors) and whether the difference exceeds it.

    The standard error of a difference of two means is sqrt(s_u²/n_u + s_s²/n_s) with the runs'
    sample standard deviations; with a single run on either side there is no spread to compare
    against (`exceeds` is None).
    """
    difference = searched["test_acc_mean"] - uniform["test_acc_mean"]
    n_u, n_s = len(uniform["test_accs"]), len(searched["test_accs"])
    if min(n_u, n_s) < 2:
        return {"budget": uniform["budget"], "difference": difference, "spread": None, "exceeds": None}
    spread = 2 * math.sqrt(uniform["test_acc_std"] ** 2 / n_u + searched["test_acc_std"] ** 2 / n_s)
    # Accuracies are multiples of 1/N, so a difference can equal its spread exactly: that does not exceed it.
    return {"budget": uniform["budget"], "difference": difference, "spread": spread,
            "exceeds": abs(difference) > spread * (1 + 1e-9) + 1e-12}


def _verdict(c):
    if c["exceeds"] is None:
        return "cannot tell: one run per configuration has no spread"
    if not c["exceeds"]:
        return "no: within the spread, the runs cannot tell them apart"
    return "yes: searched better" if c["difference"] > 0 else "yes: uniform better"


def markdown_table(rows, comparisons, layers, epochs):
    """The headline tables: accuracies per budget and method, then the searched − uniform differences."""
    lines = ["| budget | method | configuration | MACs | search-space val acc | fine-tuned test acc |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} % (n={len(r['test_accs'])})"
        lines.append(f"| {r['budget']} | {r['method']} | {config_string(r['config'])} | {r['macs'] / 1e6:.3f} M | "
                     f"{100 * r['search_val_acc']:.2f} % | {acc} |")
    lines += ["", "| budget | searched − uniform | spread (2 s.e.) | exceeds the spread? |", "|---|---:|---:|---|"]
    for c in comparisons:
        spread = "–" if c["spread"] is None else f"{100 * c['spread']:.2f} %"
        lines.append(f"| {c['budget']} | {100 * c['difference']:+.2f} % | {spread} | {_verdict(c)} |")
    lines += ["",
              f"Configuration: group size per layer, in order {', '.join(layers)}. Val = the search split (never "
              f"the report split), test = the report split. Fine-tuned {epochs} epoch{'s' * (epochs != 1)} from the "
              f"decomposition of the trained network at that configuration alone, n runs each (seeds seed … "
              f"seed+n−1): mean ± "
              f"sample std. Spread: twice the standard error of the difference of the two means, "
              f"2·sqrt(s_u²/n_u + s_s²/n_s); a difference inside it is not shown by these runs. Run 1 of each "
              f"configuration is exported as plain PyTorch to exported/<configuration>.pt."]
    return "\n".join(lines)


def _csv(rows):
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["budget", "method", "configuration", "macs", "search_val_acc", "test_acc_mean", "test_acc_std",
                     "runs", "exported"])
    for r in rows:
        writer.writerow([r["budget"], r["method"], config_string(r["config"]), r["macs"], f"{r['search_val_acc']:.6f}",
                         f"{r['test_acc_mean']:.6f}", f"{r['test_acc_std']:.6f}", len(r["test_accs"]), r["exported"]])
    return text.getvalue()


def write(out, model_name, rows, evaluated, layers, epochs):
    """Write table.md, results.csv, results.json and pareto.png under `out`; returns the markdown table.

    `rows` alternate uniform, searched per budget (as `gross.reproduce` builds them).
    """
    from gross.plots import pareto_plot

    comparisons = [compare(u, s) for u, s in zip(rows[::2], rows[1::2])]
    table = markdown_table(rows, comparisons, layers, epochs)
    atomic_write(os.path.join(out, "table.md"), table + "\n")
    atomic_write_json(os.path.join(out, "results.json"), {"model": model_name, "rows": rows,
                                                          "comparisons": comparisons,
                                                          "searched": [e.to_json() for e in evaluated]})
    atomic_write(os.path.join(out, "results.csv"), _csv(rows))
    pareto_plot(os.path.join(out, "pareto.png"), evaluated, rows, title=f"GroSS search: {model_name}")
    return table
