"""Search the configurations of a trained series model: accuracy per configuration, MACs and latency budgets, Pareto fronts."""
import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gross import distributed
from gross.config import config_space, levels, series_layers, set_config
from gross.macs import count_macs


@dataclass(frozen=True)
class Entry:
    """One evaluated configuration."""

    config: dict
    macs: int
    accuracy: float
    latency_ms: float = None  # predicted by a latency table, when the search had one

    def to_json(self):
        """Plain dict for JSON files."""
        out = {"config": dict(self.config), "macs": int(self.macs), "accuracy": float(self.accuracy)}
        if self.latency_ms is not None:
            out["latency_ms"] = float(self.latency_ms)
        return out


@dataclass
class SearchResult:
    """Outcome of a search: every evaluated configuration and the ones within budget, best first."""

    evaluated: list
    ranked: list
    pareto: list
    budget_macs: int = None
    budget_ms: float = None
    pareto_latency: list = None  # the front over predicted latency, when the search had a latency table

    @property
    def best(self):
        """Most accurate configuration within the budget."""
        return self.ranked[0]


def config_key(config):
    """Canonical, hashable form of a configuration."""
    return tuple(sorted((str(k), int(v)) for k, v in config.items()))


def rank(entries, cost="macs"):
    """Entries sorted by accuracy (high first), ties broken by lower `cost` ("macs" or "latency_ms"),
    then by configuration."""
    return sorted(entries, key=lambda e: (-e.accuracy, getattr(e, cost), config_key(e.config)))


def pareto_front(entries, cost="macs"):
    """Configurations not beaten by another with both lower-or-equal `cost` and higher accuracy, by cost.

    `cost` names the Entry field: "macs" or "latency_ms".
    """
    front = []
    for e in sorted(entries, key=lambda e: (getattr(e, cost), -e.accuracy, config_key(e.config))):
        if not front or e.accuracy > front[-1].accuracy:
            front.append(e)
    return front


# --------------------------------------------------------------------------------------------
# Evaluating configurations

class _PrefixCache:
    """Reuses module outputs between configurations that agree on every series layer run before.

    In a feed-forward pass a module's input depends only on what ran before it, so the output of
    the n-th module call is fixed by n and the group sizes of the series layers called up to it
    (its own included). While active, every SeriesConv2d and every other childless module is
    wrapped so that such an output is computed once and reused while it is still intact: its
    version counter tells whether anything modified it in place since (then it is recomputed),
    and modules' own `inplace` flags are off meanwhile so that ReLUs do not spoil conv outputs.
    Configurations in lexicographic order of their sizes share their common prefix, and one output
    is kept per call (the latest), so memory stays that of one pass. For the
    4-layer net a pass over all 252 configurations runs 1 + 6 + 36 + 252 layer calls, not 4 · 252.
    """

    def __init__(self, model):
        from gross_kernels import SeriesConv2d

        inside_series = {id(m) for layer in model.modules() if isinstance(layer, SeriesConv2d)
                         for m in layer.modules() if m is not layer}
        self.units = [m for m in model.modules() if isinstance(m, SeriesConv2d)
                      or (not any(True for _ in m.children()) and id(m) not in inside_series)]
        self.inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
        self.series = SeriesConv2d
        self.store = {}  # call n → (series prefix, output, its version) on the current branch

    def __enter__(self):
        for m in self.inplace:
            m.inplace = False
        for m in self.units:
            m.forward = self._wrap(m, m.forward)
        return self

    def __exit__(self, *exc):
        for m in self.units:
            del m.forward  # back to the class's forward
        for m in self.inplace:
            m.inplace = True
        self.store.clear()

    def new_batch(self):
        """Forget every stored output (the next pass runs on another batch)."""
        self.store.clear()

    def new_pass(self):
        """Start a forward pass: call counter and series prefix back to the start."""
        self.calls, self.prefix = 0, ()

    def _wrap(self, module, forward):
        def cached(*args, **kwargs):
            if isinstance(module, self.series):
                self.prefix += (module.group_size,)
            n, self.calls = self.calls, self.calls + 1
            hit = self.store.get(n)
            if hit is not None and hit[0] == self.prefix and hit[1]._version == hit[2]:
                return hit[1]
            # What is stored past call n stays: an entry is used only while its prefix matches, and an
            # output recomputed because it was modified in place (a residual `out += identity`) has the
            # same value, so the calls after it still hit.
            out = forward(*args, **kwargs)
            if isinstance(out, torch.Tensor):  # anything else is recomputed every time
                self.store[n] = (self.prefix, out, out._version)
            return out
        return cached


def _split(loader, split, world):
    """How processes share an evaluation: 'batches' (each its shard of the loader) or 'configs'."""
    from torch.utils.data import RandomSampler, SequentialSampler

    if split not in ("auto", "batches", "configs"):
        raise ValueError(f"split must be 'auto', 'batches' or 'configs', got {split!r}")
    if world == 1:
        return "batches"
    # Summing counts is right for any loader; splitting configurations needs every process to see
    # every sample, which a plain DataLoader (sequential or random sampler) guarantees.
    whole = isinstance(getattr(loader, "sampler", None), (SequentialSampler, RandomSampler))
    if split == "configs" and not whole:
        raise ValueError("split='configs' needs every process to see the whole validation set: give a plain "
                         "DataLoader (e.g. make_loaders(..., distributed=False)), or split='batches'")
    if split == "auto":
        return "configs" if whole else "batches"
    return split


@torch.no_grad()
def evaluate(model, configs, loader, device="cpu", progress=False, share_prefixes=True, split="auto"):
    """Top-1 accuracy (in [0, 1]) of each configuration with the trained series, no retraining.

    Every batch is loaded and moved to the device once and then run through all `configs`; with
    `share_prefixes` (for feed-forward models whose modules run deterministically) configurations
    also share the computation of their common prefix of layers (see `_PrefixCache`).
    Under torchrun the processes share the work and all return the same accuracies, those of one
    process: with `split="batches"` each runs every configuration on its shard of the loader and
    the correct counts are summed; with "configs" each runs its block of the configurations on
    the whole loader (a plain DataLoader). "auto": "configs" for a plain DataLoader, else "batches".
    """
    configs = [dict(c) for c in configs]
    if not configs:
        return []
    world = distributed.world_size()
    split = _split(loader, split, world)
    was_training = model.training
    previous = {name: layer.group_size for name, layer in series_layers(model).items()}
    # Lexicographic order in module order keeps configurations with a common prefix adjacent.
    names = list(previous)
    order = sorted(range(len(configs)), key=lambda j: [configs[j].get(n, previous[n]) for n in names])
    if split == "configs":  # a contiguous block keeps this process's prefixes shared
        me = distributed.rank()
        order = order[me * len(order) // world:(me + 1) * len(order) // world]
    model.eval()
    model.to(device)
    correct = [0] * len(configs)
    total = 0
    try:
        with _PrefixCache(model) if share_prefixes else contextlib.nullcontext() as cache:
            for images, labels in tqdm(loader, desc=f"eval x{len(configs)}", leave=False,
                                       disable=not progress or not distributed.is_main()):
                total += labels.numel()
                if not order:
                    continue
                images, labels = images.to(device), labels.to(device)
                if cache is not None:
                    cache.new_batch()
                for j in order:
                    set_config(model, configs[j])
                    if cache is not None:
                        cache.new_pass()
                    correct[j] += (model(images).argmax(1) == labels).sum().item()
    finally:
        set_config(model, previous)
        model.train(was_training)
    if world > 1:
        # Counts are integers, so their sums (in float64) are exact: the same ratios as one process.
        *correct, summed = distributed.all_sum(correct + [total], device)
        total = summed if split == "batches" else total
    if total == 0:
        raise ValueError("loader is empty: no data to evaluate configurations on")
    return [c / total for c in correct]


class AdditiveCost:
    """A cost that adds up over layers: `rest` plus `per_layer[name][group size]` (MACs, latency).

    The one interface budgets plug into: `MacsTable` and `gross.latency.LatencyTable` implement it.
    """

    per_layer: dict
    rest: float

    def __call__(self, config):
        """Total cost of the model at `config`."""
        return self.rest + sum(self.per_layer[name][g] for name, g in config.items())

    def minimum(self, space):
        """The least cost of any configuration of `space`: every layer at its cheapest size there."""
        return self.rest + sum(min(self.per_layer[name][g] for g in sizes) for name, sizes in space.items())


class MacsTable(AdditiveCost):
    """MACs of any configuration from one count per group-size index, since MACs add up per layer.

    `input_size` is one input's (C, H, W), as for `gross.count_macs`.
    """

    def __init__(self, model, input_size):
        space = config_space(model)
        previous = {name: layer.group_size for name, layer in series_layers(model).items()}
        self.per_layer = {name: {} for name in space}
        try:
            # Index j of every layer at once (clamped to its largest size): one count per index.
            for j, config in enumerate(levels(space) or [{}]):
                set_config(model, config)
                total, rows = count_macs(model, input_size, per_layer=True)
                layers = {}
                for row in rows:  # one row per call: a layer run twice counts twice
                    layers[row["layer"]] = layers.get(row["layer"], 0) + row["macs"]
                for name, g in config.items():
                    self.per_layer[name][g] = int(layers[name])
                if j == 0:
                    self.rest = int(total) - sum(int(layers[n]) for n in config)
        finally:
            set_config(model, previous)


# --------------------------------------------------------------------------------------------
# Results file: JSON lines, one evaluated configuration per line, appended and flushed

class ResultsFile:
    """Append-only JSON-lines record of evaluated configurations that a rerun resumes from.

    Under torchrun only rank 0 reads and writes the file; the others get what it read.
    """

    def __init__(self, path, space):
        self.path = path
        self.done = {}
        header = {"space": {k: list(v) for k, v in space.items()}}
        outcome = None
        if distributed.is_main():
            try:
                if path and os.path.exists(path):
                    self._load(header)
                elif path:
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                    self._append([header])
                outcome = self.done
            except ValueError as err:  # every process raises it, none waits for the others
                outcome = err
        outcome = distributed.broadcast(outcome)
        if isinstance(outcome, ValueError):
            raise outcome
        self.done = outcome

    def _load(self, header):
        with open(self.path) as f:
            lines = f.read().split("\n")
        records = []
        # The last line may be torn by a crash mid-write: everything before it is complete.
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1 and any(s.strip() for s in lines[i + 1:]):
                    raise ValueError(f"results file {self.path}: line {i + 1} is not valid JSON")
        if not records or records[0] != header:
            raise ValueError(f"results file {self.path} was written for another search space; "
                             f"delete it or pass another path")
        for r in records[1:]:
            e = Entry(r["config"], int(r["macs"]), float(r["accuracy"]), r.get("latency_ms"))
            self.done[config_key(e.config)] = e
        if lines and lines[-1].strip():
            # Drop a torn tail so the next append starts on a fresh line.
            with open(self.path, "w") as f:
                f.write("\n".join(json.dumps(r) for r in records) + "\n")

    def _append(self, records):
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, entries):
        """Record newly evaluated entries."""
        for e in entries:
            self.done[config_key(e.config)] = e
        if self.path and distributed.is_main():
            self._append([e.to_json() for e in entries])


# --------------------------------------------------------------------------------------------
# Search strategies over an abstract space: {layer: sizes}, score(configs) -> accuracies, macs(config),
# and optionally latency(config) in ms

class _Evaluator:
    """Scores configurations in chunks, skipping those already in the results file.

    The file keeps accuracies; MACs and latency are the cost functions' (a resumed search may
    bring a latency table the first run did not have).
    """

    def __init__(self, score, macs, latency, results, chunk, bar):
        self.score, self.macs, self.latency = score, macs, latency
        self.results, self.chunk, self.bar = results, chunk, bar

    def _entry(self, config, accuracy):
        latency = None if self.latency is None else float(self.latency(config))
        return Entry(dict(config), self.macs(config), float(accuracy), latency)

    def __call__(self, configs):
        out, todo = {}, []
        for c in configs:
            k = config_key(c)
            if k in self.results.done:
                out[k] = self._entry(c, self.results.done[k].accuracy)
                self.bar.update(1)
            elif k not in out:
                out[k] = None
                todo.append(c)
        for start in range(0, len(todo), self.chunk):
            part = todo[start:start + self.chunk]
            accs = self.score(part)
            entries = [self._entry(c, a) for c, a in zip(part, accs)]
            self.results.add(entries)
            for e in entries:
                out[config_key(e.config)] = e
            self.bar.update(len(part))
        return [out[config_key(c)] for c in configs]


class _Budget:
    """The budgets a search was given (MACs, latency in ms, either or both), checked against the space."""

    def __init__(self, space, macs, budget_macs, latency, budget_ms):
        if budget_ms is not None and latency is None:
            raise ValueError("budget_ms needs a latency table (latency=...): measure one with gross.latency.profile")
        self.budget_macs, self.budget_ms = budget_macs, budget_ms
        self.limits = []
        for name, cost, value, what in (("budget_macs", macs, budget_macs, "MACs"),
                                        ("budget_ms", latency, budget_ms, "predicted latency")):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            # An additive cost knows its cheapest configuration; otherwise the smallest sizes are.
            least = (cost.minimum(space) if isinstance(cost, AdditiveCost)
                     else cost({n: sizes[0] for n, sizes in space.items()}))
            if value < least:
                shown = (lambda v: f"{int(v):,}") if name == "budget_macs" else (lambda v: f"{v:.4g} ms")
                raise ValueError(f"{name}={shown(value)} is below the smallest configuration's {what} "
                                 f"({shown(least)}): no configuration fits")
            self.limits.append((cost, value))

    @property
    def given(self):
        """True when there is any budget (without one nothing stops a bfs path)."""
        return bool(self.limits)

    def fits(self, config):
        """True when `config` is within every budget."""
        return all(cost(config) <= value for cost, value in self.limits)

    def result(self, evaluated, latency):
        """The SearchResult of `evaluated` under these budgets."""
        within = [e for e in evaluated if self.fits(e.config)]
        # Equally accurate configurations: the one cheaper in what the budget bounds first.
        ranked = rank(within, "macs" if self.budget_ms is None else "latency_ms")
        return SearchResult(evaluated=evaluated, ranked=ranked, pareto=pareto_front(within),
                            budget_macs=self.budget_macs, budget_ms=self.budget_ms,
                            pareto_latency=None if latency is None else pareto_front(within, "latency_ms"))


def _normalise_space(space):
    if not space:
        raise ValueError("the model has no SeriesConv2d layers: nothing to search")
    return {name: tuple(sorted(int(g) for g in sizes)) for name, sizes in space.items()}


def _bar(total, desc, progress):
    return tqdm(total=total, desc=desc, disable=not progress or not distributed.is_main())


def exhaustive_space(space, score, macs, budget_macs=None, results=None, chunk=16, progress=True, *,
                     latency=None, budget_ms=None):
    """Evaluate every configuration of `space` within the budgets (MACs and/or predicted latency).

    `space` maps layer names to their group sizes, `score(configs)` returns one accuracy per
    configuration, `macs(config)` its MACs and `latency(config)` (optional, e.g. a
    `gross.latency.LatencyTable`) its latency in ms; `budget_ms` needs `latency`. `results` is a
    JSON-lines path to resume from.
    """
    space = _normalise_space(space)
    budget = _Budget(space, macs, budget_macs, latency, budget_ms)
    names = list(space)
    configs = [dict(zip(names, sizes)) for sizes in itertools.product(*(space[n] for n in names))]
    # Filtering by cost first is cheap (table lookups) and skips whole evaluations.
    configs = [c for c in configs if budget.fits(c)]
    store = ResultsFile(results, space)
    with _bar(len(configs), "exhaustive search", progress) as bar:
        evaluated = _Evaluator(score, macs, latency, store, chunk, bar)(configs)
    return budget.result(evaluated, latency)


def bfs_space(space, score, macs, budget_macs=None, beam=8, results=None, chunk=16, progress=True, *,
              latency=None, budget_ms=None):
    """Beam breadth-first search from the largest configuration down to the budgets.

    Algorithm: level 0 is the configuration with every layer at its largest group size. Each
    level expands every configuration of the frontier into its children, the configurations
    that take one layer one step down its list of group sizes; children already seen are
    dropped and the rest are evaluated (a whole level at a time, so `chunk` configurations
    share each pass over the data). Children within every budget (MACs and/or predicted
    latency, as for `exhaustive_space`) are candidates and are not expanded further (a smaller
    group size only costs accuracy, and MACs only fall along a path; latency need not, so
    under a latency budget the search is a heuristic). The next frontier is the `beam` most
    accurate children still over a budget. The search stops when the frontier is empty;
    without a budget it runs down to the smallest configuration. The result ranks every
    evaluated candidate within the budgets. Cost: at most `beam * Σ_layers (n_sizes - 1)`
    evaluations per level, instead of Π n_sizes.
    """
    space = _normalise_space(space)
    budget = _Budget(space, macs, budget_macs, latency, budget_ms)
    if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
        raise ValueError(f"beam must be a positive int, got {beam!r}")
    # Without a budget nothing stops a path: the search runs down to the smallest configuration.
    fits = budget.fits if budget.given else (lambda c: False)
    index = {name: {g: i for i, g in enumerate(sizes)} for name, sizes in space.items()}
    store = ResultsFile(results, space)
    levels = sum(len(s) - 1 for s in space.values())
    with _bar(None, "bfs search", progress) as bar:
        evaluate_ = _Evaluator(score, macs, latency, store, chunk, bar)
        top = {name: sizes[-1] for name, sizes in space.items()}
        seen = {config_key(top)}
        evaluated = evaluate_([top])
        frontier = [] if fits(top) else evaluated
        for _ in range(levels):
            if not frontier:
                break
            children = []
            for e in frontier:
                for name, g in e.config.items():
                    i = index[name][g]
                    if i > 0:
                        child = dict(e.config, **{name: space[name][i - 1]})
                        if config_key(child) not in seen:
                            seen.add(config_key(child))
                            children.append(child)
            level = evaluate_(children)
            evaluated.extend(level)
            frontier = rank([e for e in level if not fits(e.config)])[:beam]
    return budget.result(evaluated, latency)


# --------------------------------------------------------------------------------------------
# Model-level entry points

def _model_search(strategy, model, loader, input_size, budget_macs, latency, budget_ms, device, results, chunk,
                  progress, split, **kw):
    from gross.latency import LatencyTable

    if latency is not None:
        if not isinstance(latency, LatencyTable):
            raise TypeError(f"latency must be a gross.latency.LatencyTable, got {type(latency).__name__}")
        # Measured on this machine's device of its kind, for this model and input size.
        latency.check(model=model, input_size=input_size, device=latency.device["type"])
    distributed.init_from_env()  # under torchrun: join the group, so the processes share the evaluations
    space = config_space(model)
    macs = MacsTable(model, input_size)
    model.to(device)

    def score(configs):
        return evaluate(model, configs, loader, device, split=split)

    return strategy(space, score, macs, budget_macs=budget_macs, results=results, chunk=chunk,
                    progress=progress, latency=latency, budget_ms=budget_ms, **kw)


def exhaustive(model, loader, input_size, budget_macs=None, *, latency=None, budget_ms=None, device="cpu",
               results=None, configs_per_pass=16, progress=True, split="auto"):
    """Every configuration of `model` within the budgets, ranked by validation accuracy.

    `budget_macs` bounds MACs; `budget_ms` bounds the latency that `latency` (a
    `gross.latency.LatencyTable` measured for this model and input size) predicts, and with a
    table every result carries its predicted latency too. `configs_per_pass` configurations share
    each pass over `loader`; `results` (a JSON-lines path) records every evaluation as it
    finishes and lets a rerun resume without re-evaluating. Under torchrun the processes share
    the evaluations (`split`, see `evaluate`) and all return the result of one process.
    Returns a `SearchResult` (`.ranked`, `.pareto`, `.pareto_latency`, `.best`, `.evaluated`).
    """
    return _model_search(exhaustive_space, model, loader, input_size, budget_macs, latency, budget_ms, device,
                         results, configs_per_pass, progress, split)


def bfs(model, loader, input_size, budget_macs=None, *, latency=None, budget_ms=None, beam=8, device="cpu",
        results=None, configs_per_pass=16, progress=True, split="auto"):
    """Beam breadth-first search of `model`'s configurations down to the budgets (see `bfs_space`, `exhaustive`)."""
    return _model_search(bfs_space, model, loader, input_size, budget_macs, latency, budget_ms, device, results,
                         configs_per_pass, progress, split, beam=beam)


def space_size(model):
    """Number of configurations of `model`."""
    return math.prod(len(s) for s in config_space(model).values())
