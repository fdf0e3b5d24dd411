"""The headline experiment: every stage in order, then per budget the uniform and the searched configuration
fine-tuned n times, and the report (see gross.report)."""
from gross import report, search
from gross.stages.finetune import finetune
from gross.stages.search import search_budgets
from gross.stages.space import trained_space


def reproduce(exp):
    """Run every stage of `exp` (finished ones are loaded), write the report; returns the markdown table."""
    exp.check()
    model = trained_space(exp)
    budgets = [exp.named_config(model, b) for b in exp.settings.reproduce.budgets]
    ranked, evaluated, search_acc = search_budgets(exp, model, [config for _, config in budgets])
    macs = search.MacsTable(model, exp.input_size)
    runs = exp.settings.reproduce.runs
    rows = []
    for (label, uniform), within in zip(budgets, ranked):
        for method, config in (("uniform", uniform), ("searched", within[0].config)):
            results = [finetune(exp, config, r) for r in range(runs)]
            rows.append(report.row(label, method, config, macs(config), search_acc[search.config_key(config)],
                                   results))
    return report.write(exp.out, exp.name, rows, evaluated, list(exp.spec), exp.recipes["finetune"].epochs)
