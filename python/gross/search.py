"""Search the configurations of a trained series model: accuracy per configuration, MACs budget, Pareto front."""
import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gross.config import config_space, series_layers, set_config
from gross.macs import count_macs


@dataclass(frozen=True)
class Entry:
    """One evaluated configuration."""

    config: dict
    macs: int
    accuracy: float

    def to_json(self):
        """Plain dict for JSON files."""
        return {"config": dict(self.config), "macs": int(self.macs), "accuracy": float(self.accuracy)}


@dataclass
class SearchResult:
    """Outcome of a search: every evaluated configuration and the ones within budget, best first."""

    evaluated: list
    ranked: list
    pareto: list
    budget_macs: int = None

    @property
    def best(self):
        """Most accurate configuration within the budget."""
        return self.ranked[0]


def config_key(config):
    """Canonical, hashable form of a configuration."""
    return tuple(sorted((str(k), int(v)) for k, v in config.items()))


def rank(entries):
    """Entries sorted by accuracy (high first), ties broken by fewer MACs then by configuration."""
    return sorted(entries, key=lambda e: (-e.accuracy, e.macs, config_key(e.config)))


def pareto_front(entries):
    """Configurations not beaten by another with both fewer-or-equal MACs and higher accuracy, by MACs."""
    front = []
    for e in sorted(entries, key=lambda e: (e.macs, -e.accuracy, config_key(e.config))):
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
    Configurations in lexicographic order of their sizes share their common prefix, and only the
    current branch is kept (one output per call), so memory stays that of one pass. For the
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
            # A new branch from call n on: what was stored past it belonged to the old branch.
            for k in [k for k in self.store if k >= n]:
                del self.store[k]
            out = forward(*args, **kwargs)
            if isinstance(out, torch.Tensor):  # anything else is recomputed every time
                self.store[n] = (self.prefix, out, out._version)
            return out
        return cached


@torch.no_grad()
def evaluate(model, configs, loader, device="cpu", progress=False, share_prefixes=True):
    """Top-1 accuracy (in [0, 1]) of each configuration with the trained series, no retraining.

    Every batch is loaded and moved to the device once and then run through all `configs`; with
    `share_prefixes` (for feed-forward models whose modules run deterministically) configurations
    also share the computation of their common prefix of layers (see `_PrefixCache`).
    """
    configs = [dict(c) for c in configs]
    if not configs:
        return []
    was_training = model.training
    previous = {name: layer.group_size for name, layer in series_layers(model).items()}
    # Lexicographic order in module order keeps configurations with a common prefix adjacent.
    names = list(previous)
    order = sorted(range(len(configs)), key=lambda j: [configs[j].get(n, previous[n]) for n in names])
    model.eval()
    model.to(device)
    correct = [0] * len(configs)
    total = 0
    try:
        with _PrefixCache(model) if share_prefixes else contextlib.nullcontext() as cache:
            for images, labels in tqdm(loader, desc=f"eval x{len(configs)}", leave=False, disable=not progress):
                images, labels = images.to(device), labels.to(device)
                if cache is not None:
                    cache.new_batch()
                for j in order:
                    set_config(model, configs[j])
                    if cache is not None:
                        cache.new_pass()
                    correct[j] += (model(images).argmax(1) == labels).sum().item()
                total += labels.numel()
    finally:
        set_config(model, previous)
        model.train(was_training)
    if total == 0:
        raise ValueError("loader is empty: no data to evaluate configurations on")
    return [c / total for c in correct]


class MacsTable:
    """MACs of any configuration from one count per group-size index, since MACs add up per layer.

    `input_size` is one input's (C, H, W), as for `gross.count_macs`.
    """

    def __init__(self, model, input_size):
        space = config_space(model)
        previous = {name: layer.group_size for name, layer in series_layers(model).items()}
        self.per_layer = {name: {} for name in space}
        try:
            depth = max((len(sizes) for sizes in space.values()), default=0)
            for j in range(max(depth, 1)):
                # Index j of every layer at once (clamped to its largest size): one count per index.
                config = {name: sizes[min(j, len(sizes) - 1)] for name, sizes in space.items()}
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

    def __call__(self, config):
        """Total MACs of the model at `config`."""
        return self.rest + sum(self.per_layer[name][g] for name, g in config.items())


# --------------------------------------------------------------------------------------------
# Results file: JSON lines, one evaluated configuration per line, appended and flushed

class ResultsFile:
    """Append-only JSON-lines record of evaluated configurations that a rerun resumes from."""

    def __init__(self, path, space):
        self.path = path
        self.done = {}
        header = {"space": {k: list(v) for k, v in space.items()}}
        if path and os.path.exists(path):
            self._load(header)
        elif path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._append([header])

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
            e = Entry(r["config"], int(r["macs"]), float(r["accuracy"]))
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
        if self.path:
            self._append([e.to_json() for e in entries])


# --------------------------------------------------------------------------------------------
# Search strategies over an abstract space: {layer: sizes}, score(configs) -> accuracies, macs(config)

class _Evaluator:
    """Scores configurations in chunks, skipping those already in the results file."""

    def __init__(self, score, macs, results, chunk, bar):
        self.score, self.macs, self.results, self.chunk, self.bar = score, macs, results, chunk, bar

    def __call__(self, configs):
        out, todo = {}, []
        for c in configs:
            k = config_key(c)
            if k in self.results.done:
                out[k] = self.results.done[k]
                self.bar.update(1)
            elif k not in out:
                out[k] = None
                todo.append(c)
        for start in range(0, len(todo), self.chunk):
            part = todo[start:start + self.chunk]
            accs = self.score(part)
            entries = [Entry(dict(c), self.macs(c), float(a)) for c, a in zip(part, accs)]
            self.results.add(entries)
            for e in entries:
                out[config_key(e.config)] = e
            self.bar.update(len(part))
        return [out[config_key(c)] for c in configs]


def _check_budget(space, macs, budget_macs):
    if budget_macs is None:
        return
    if not isinstance(budget_macs, (int, float)) or isinstance(budget_macs, bool) or budget_macs <= 0:
        raise ValueError(f"budget_macs must be a positive number, got {budget_macs!r}")
    smallest = macs({name: sizes[0] for name, sizes in space.items()})
    if budget_macs < smallest:
        raise ValueError(f"budget_macs={int(budget_macs):,} is below the smallest configuration's "
                         f"MACs ({smallest:,}): no configuration fits")


def _result(evaluated, budget_macs):
    within = [e for e in evaluated if budget_macs is None or e.macs <= budget_macs]
    return SearchResult(evaluated=evaluated, ranked=rank(within), pareto=pareto_front(within),
                        budget_macs=budget_macs)


def _normalise_space(space):
    if not space:
        raise ValueError("the model has no SeriesConv2d layers: nothing to search")
    return {name: tuple(sorted(int(g) for g in sizes)) for name, sizes in space.items()}


def exhaustive_space(space, score, macs, budget_macs=None, results=None, chunk=16, progress=True):
    """Evaluate every configuration of `space` whose MACs fit the budget.

    `space` maps layer names to their group sizes, `score(configs)` returns one accuracy per
    configuration, `macs(config)` its MACs; `results` is a JSON-lines path to resume from.
    """
    space = _normalise_space(space)
    _check_budget(space, macs, budget_macs)
    names = list(space)
    configs = [dict(zip(names, sizes)) for sizes in itertools.product(*(space[n] for n in names))]
    # Filtering by MACs first is cheap (a table lookup) and skips whole evaluations.
    configs = [c for c in configs if budget_macs is None or macs(c) <= budget_macs]
    store = ResultsFile(results, space)
    with tqdm(total=len(configs), desc="exhaustive search", disable=not progress) as bar:
        evaluated = _Evaluator(score, macs, store, chunk, bar)(configs)
    return _result(evaluated, budget_macs)


def bfs_space(space, score, macs, budget_macs=None, beam=8, results=None, chunk=16, progress=True):
    """Beam breadth-first search from the largest configuration down to the MACs budget.

    Algorithm: level 0 is the configuration with every layer at its largest group size. Each
    level expands every configuration of the frontier into its children, the configurations
    that take one layer one step down its list of group sizes; children already seen are
    dropped and the rest are evaluated (a whole level at a time, so `chunk` configurations
    share each pass over the data). Children whose MACs fit the budget are candidates and are
    not expanded further (a smaller group size only costs accuracy, and MACs only fall along a
    path). The next frontier is the `beam` most accurate children still over the budget. The
    search stops when the frontier is empty; without a budget it runs down to the smallest
    configuration. The result ranks every evaluated candidate within the budget. Cost: at most
    `beam * Σ_layers (n_sizes - 1)` evaluations per level, instead of Π n_sizes.
    """
    space = _normalise_space(space)
    _check_budget(space, macs, budget_macs)
    if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
        raise ValueError(f"beam must be a positive int, got {beam!r}")
    # Without a budget nothing stops a path: the search runs down to the smallest configuration.
    fits = (lambda c: False) if budget_macs is None else (lambda c: macs(c) <= budget_macs)
    index = {name: {g: i for i, g in enumerate(sizes)} for name, sizes in space.items()}
    store = ResultsFile(results, space)
    levels = sum(len(s) - 1 for s in space.values())
    with tqdm(total=None, desc="bfs search", disable=not progress) as bar:
        evaluate_ = _Evaluator(score, macs, store, chunk, bar)
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
    return _result(evaluated, budget_macs)


# --------------------------------------------------------------------------------------------
# Model-level entry points

def _model_search(strategy, model, loader, input_size, budget_macs, device, results, chunk, progress, **kw):
    space = config_space(model)
    macs = MacsTable(model, input_size)
    model.to(device)

    def score(configs):
        return evaluate(model, configs, loader, device)

    return strategy(space, score, macs, budget_macs=budget_macs, results=results, chunk=chunk,
                    progress=progress, **kw)


def exhaustive(model, loader, input_size, budget_macs=None, *, device="cpu", results=None,
               configs_per_pass=16, progress=True):
    """Every configuration of `model` within `budget_macs`, ranked by validation accuracy.

    `configs_per_pass` configurations share each pass over `loader`; `results` (a JSON-lines
    path) records every evaluation as it finishes and lets a rerun resume without re-evaluating.
    Returns a `SearchResult` (`.ranked`, `.pareto`, `.best`, `.evaluated`).
    """
    return _model_search(exhaustive_space, model, loader, input_size, budget_macs, device, results,
                         configs_per_pass, progress)


def bfs(model, loader, input_size, budget_macs=None, *, beam=8, device="cpu", results=None,
        configs_per_pass=16, progress=True):
    """Beam breadth-first search of `model`'s configurations down to `budget_macs` (see `bfs_space`)."""
    return _model_search(bfs_space, model, loader, input_size, budget_macs, device, results,
                         configs_per_pass, progress, beam=beam)


def space_size(model):
    """Number of configurations of `model`."""
    return math.prod(len(s) for s in config_space(model).values())
