"""Stage `search`: rank the trained search space's configurations on the search split under MACs (and latency) budgets."""
from gross import search as strategies


def search(exp, model, budget_macs=None, latency=None, budget_ms=None):
    """Search `model`'s configurations under `budget_macs` (and `budget_ms`, predicted by the latency table
    `latency`) with the configured strategy (results resumable)."""
    exp.snapshot()
    s = exp.settings.search
    common = dict(device=exp.device, results=exp.path("search.jsonl"), configs_per_pass=s.configs_per_pass,
                  progress=exp.progress, latency=latency, budget_ms=budget_ms)
    search_loader = exp.eval_loaders()[0]
    if s.strategy == "exhaustive":
        return strategies.exhaustive(model, search_loader, exp.input_size, budget_macs, **common)
    return strategies.bfs(model, search_loader, exp.input_size, budget_macs, beam=s.beam, **common)


def search_budgets(exp, model, budgets):
    """For each budget configuration (its MACs bound the budget): the configurations within it, best first.

    Returns (one ranked list per budget, every evaluated entry, search accuracy per config key).
    An exhaustive search runs once for all budgets; bfs once per budget. A budget's own
    configuration is scored too when the search did not visit it.
    """
    macs = strategies.MacsTable(model, exp.input_size)
    exp.log(f"[search] {exp.settings.search.strategy} over {strategies.space_size(model):,} configurations, "
            f"{len(budgets)} budgets")
    if exp.settings.search.strategy == "exhaustive":
        evaluated = search(exp, model).evaluated
        ranked = [strategies.rank([e for e in evaluated if e.macs <= macs(c)]) for c in budgets]
    else:
        found = [search(exp, model, macs(c)) for c in budgets]
        ranked = [r.ranked for r in found]
        evaluated = list({strategies.config_key(e.config): e for r in found for e in r.evaluated}.values())
    accuracy = {strategies.config_key(e.config): e.accuracy for e in evaluated}
    missing = [c for c in budgets if strategies.config_key(c) not in accuracy]
    if missing:
        scores = strategies.evaluate(model, missing, exp.eval_loaders()[0], exp.device)
        accuracy.update({strategies.config_key(c): a for c, a in zip(missing, scores)})
    exp.log(f"[search] {len(evaluated):,} configurations evaluated")
    return ranked, evaluated, accuracy
