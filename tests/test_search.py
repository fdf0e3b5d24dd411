"""Search: known answers on a toy space, exhaustive vs bfs, MACs and latency budgets, budget errors, resuming,
real model evaluation, torchrun processes."""
import itertools
import json
import math
import textwrap

import pytest
import torch

from gross import search
from pipeline_helpers import one_thread, run_torchrun  # noqa: F401

SPACE = {"a": (1, 2, 4, 8), "b": (1, 2, 4), "c": (2, 4, 8, 16)}
WEIGHT = {"a": 30, "b": 70, "c": 11}
GAIN = {"a": 0.05, "b": 0.17, "c": 0.031}


def toy_macs(config):
    return 1000 + sum(WEIGHT[n] * g for n, g in config.items())


def toy_accuracy(config):
    # Monotone in every group size, with layer-specific gains so there are no ties.
    return 0.3 + sum(GAIN[n] * math.log2(g) for n, g in config.items())


class CountingScore:
    def __init__(self):
        self.calls = []

    def __call__(self, configs):
        self.calls.append(len(configs))
        return [toy_accuracy(c) for c in configs]


def all_configs():
    names = list(SPACE)
    return [dict(zip(names, p)) for p in itertools.product(*SPACE.values())]


@pytest.mark.parametrize("budget", [None, 1400, 1500, 1800])
def test_exhaustive_finds_the_known_best(budget):
    within = [c for c in all_configs() if budget is None or toy_macs(c) <= budget]
    expected = max(within, key=toy_accuracy)
    score = CountingScore()
    result = search.exhaustive_space(SPACE, score, toy_macs, budget, chunk=5, progress=False)
    assert result.best.config == expected
    assert len(result.ranked) == len(within) == sum(score.calls)
    assert max(score.calls) <= 5
    assert [e.accuracy for e in result.ranked] == sorted((e.accuracy for e in result.ranked), reverse=True)
    assert all(e.macs == toy_macs(e.config) for e in result.ranked)


@pytest.mark.parametrize("budget", [1400, 1500, 1800, 2100])
def test_bfs_agrees_with_exhaustive(budget):
    best = search.exhaustive_space(SPACE, CountingScore(), toy_macs, budget, progress=False).best
    wide = search.bfs_space(SPACE, CountingScore(), toy_macs, budget, beam=1000, progress=False)
    assert wide.best.config == best.config
    greedy_score = CountingScore()
    greedy = search.bfs_space(SPACE, greedy_score, toy_macs, budget, beam=1, progress=False)
    assert sum(greedy_score.calls) < len(all_configs())
    assert all(e.macs <= budget for e in greedy.ranked)
    assert greedy.best.accuracy <= best.accuracy


def test_bfs_without_budget_reaches_the_smallest_configuration():
    result = search.bfs_space(SPACE, CountingScore(), toy_macs, None, beam=2, progress=False)
    assert {n: s[0] for n, s in SPACE.items()} in [e.config for e in result.evaluated]
    assert len({search.config_key(e.config) for e in result.evaluated}) == len(result.evaluated)


def test_pareto_front_is_the_non_dominated_set():
    entries = [search.Entry(c, toy_macs(c), toy_accuracy(c)) for c in all_configs()]
    front = search.pareto_front(entries)
    for e in entries:
        dominated = any(f.macs <= e.macs and f.accuracy > e.accuracy for f in entries)
        assert (e in front) == (not dominated)
    assert [f.macs for f in front] == sorted(f.macs for f in front)


@pytest.mark.parametrize("strategy", [search.exhaustive_space, search.bfs_space])
def test_budget_below_smallest_configuration_is_a_clear_error(strategy):
    smallest = toy_macs({n: s[0] for n, s in SPACE.items()})
    with pytest.raises(ValueError, match="below the smallest configuration"):
        strategy(SPACE, CountingScore(), toy_macs, smallest - 1, progress=False)
    with pytest.raises(ValueError, match="budget_macs"):
        strategy(SPACE, CountingScore(), toy_macs, -5, progress=False)


@pytest.mark.parametrize("strategy", [search.exhaustive_space, search.bfs_space])
def test_rerun_resumes_from_the_results_file(tmp_path, strategy):
    path = tmp_path / "results.jsonl"
    first = strategy(SPACE, CountingScore(), toy_macs, 1800, results=str(path), chunk=4, progress=False)

    def must_not_run(configs):
        raise AssertionError("a resumed search re-evaluated a configuration")

    again = strategy(SPACE, must_not_run, toy_macs, 1800, results=str(path), progress=False)
    assert [e.to_json() for e in again.ranked] == [e.to_json() for e in first.ranked]

    # A crash mid-write leaves a torn last line: only that configuration is evaluated again.
    text = path.read_text()
    path.write_text(text[:-7])
    score = CountingScore()
    resumed = strategy(SPACE, score, toy_macs, 1800, results=str(path), progress=False)
    assert sum(score.calls) == 1
    assert [e.to_json() for e in resumed.ranked] == [e.to_json() for e in first.ranked]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_results_file_of_another_space_is_refused(tmp_path):
    path = str(tmp_path / "r.jsonl")
    search.exhaustive_space(SPACE, CountingScore(), toy_macs, None, results=path, progress=False)
    other = dict(SPACE, b=(2, 4))
    with pytest.raises(ValueError, match="another search space"):
        search.exhaustive_space(other, CountingScore(), toy_macs, None, results=path, progress=False)


def test_bad_beam_is_refused():
    with pytest.raises(ValueError, match="beam"):
        search.bfs_space(SPACE, CountingScore(), toy_macs, None, beam=0, progress=False)


# --------------------------------------------------------------------------------------------
# On a real (tiny) series model

def tiny_model():
    import torch.nn as nn
    from gross_kernels import SeriesConv2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        SeriesConv2d(8, 8, 3, [1, 2, 4, 8], padding=1), nn.ReLU(),
        SeriesConv2d(8, 12, 3, [2, 8], bottleneck=(8, 12), stride=2, padding=1),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def tiny_loader(model, n=40, batch=16):
    # Labels are the model's own predictions at the largest configuration (accuracy 1 there), so
    # smaller configurations score visibly less.
    from gross.config import extreme_config, set_config

    x = torch.randn(n, 3, 8, 8)
    set_config(model, extreme_config(model))
    with torch.no_grad():
        y = model(x).argmax(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def test_evaluate_matches_one_configuration_at_a_time():
    from gross.config import set_config

    model = tiny_model()
    loader = tiny_loader(model)
    configs = [{"4": 8, "2": 1}, {"4": 2, "2": 4}, {"4": 8, "2": 8}]
    accs = search.evaluate(model, configs, loader)
    for config, acc in zip(configs, accs):
        set_config(model, config)
        with torch.no_grad():
            expected = sum((model(x).argmax(1) == y).sum().item() for x, y in loader) / 40
        assert acc == pytest.approx(expected)
    assert accs[2] == 1.0 and min(accs) < 1.0


def test_macs_table_matches_count_macs_for_every_configuration():
    from gross.config import set_config
    from gross.macs import count_macs

    model = tiny_model()
    table = search.MacsTable(model, (3, 8, 8))
    for g2 in (1, 2, 4, 8):
        for g4 in (2, 8):
            set_config(model, {"2": g2, "4": g4})
            assert table({"2": g2, "4": g4}) == count_macs(model, (3, 8, 8))


def test_model_search_exhaustive_and_bfs(tmp_path):
    model = tiny_model()
    loader = tiny_loader(model)
    table = search.MacsTable(model, (3, 8, 8))
    budget = table({"2": 4, "4": 8})
    path = str(tmp_path / "r.jsonl")
    full = search.exhaustive(model, loader, (3, 8, 8), budget, results=path, configs_per_pass=3, progress=False)
    assert all(e.macs <= budget for e in full.ranked) and len(full.ranked) >= 2
    direct = search.evaluate(model, [e.config for e in full.ranked], loader)
    assert [e.accuracy for e in full.ranked] == pytest.approx(direct)
    wide = search.bfs(model, loader, (3, 8, 8), budget, beam=100, results=path, progress=False)
    assert {search.config_key(e.config) for e in wide.ranked} <= {search.config_key(e.config) for e in full.ranked}
    assert wide.best.accuracy <= full.best.accuracy
    with pytest.raises(ValueError, match="below the smallest"):
        search.exhaustive(model, loader, (3, 8, 8), table({"2": 1, "4": 2}) - 1, progress=False)


class _Residual(torch.nn.Module):
    """A block with an in-place residual add and a module called twice, as in torchvision's ResNet."""

    def __init__(self):
        super().__init__()
        from gross_kernels import SeriesConv2d

        self.conv = SeriesConv2d(8, 8, 3, [2, 4, 8], padding=1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.conv(x))
        out += x
        return self.relu(out)


def test_shared_prefix_evaluation_equals_plain_evaluation():
    import torch.nn as nn
    from gross.config import config_space
    from gross_kernels import SeriesConv2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Residual(), _Residual(),
                          SeriesConv2d(8, 4, 3, [1, 2], bottleneck=(2, 4), stride=2, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    loader = tiny_loader(model, n=24, batch=10)
    space = config_space(model)
    configs = [dict(zip(space, sizes)) for sizes in itertools.product(*space.values())]
    configs = configs[::-1][:7] + configs[7:]  # an order the cache has to sort out
    shared = search.evaluate(model, configs, loader, share_prefixes=True)
    plain = search.evaluate(model, configs, loader, share_prefixes=False)
    assert shared == plain
    assert len(set(plain)) > 1
    # The wrappers are gone afterwards: the model runs its own forward again.
    assert all("forward" not in vars(m) for m in model.modules())
    assert model[1].relu.inplace and model[2].relu.inplace


# --------------------------------------------------------------------------------------------
# Latency budgets

def toy_latency():
    """A synthetic latency table over SPACE that disagrees with MACs: layer b's group size 1 (the
    cheapest in MACs) is the slowest, and group size 8 of layer a costs hardly more than 1."""
    from gross.latency import LatencyTable, describe_device

    per_layer = {"a": {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.05}, "b": {1: 2.0, 2: 1.0, 4: 1.5},
                 "c": {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.1}}
    return LatencyTable(per_layer, 1.0, device=describe_device("cpu"), input_size=(3, 8, 8), batch_size=1,
                        dtype="float32", backward=False, model=None)


def test_latency_budget_chooses_differently_from_the_macs_budget():
    reference = {"a": 4, "b": 4, "c": 4}  # the uniform configuration at 4
    table = toy_latency()
    by_macs = search.exhaustive_space(SPACE, CountingScore(), toy_macs, toy_macs(reference), progress=False)
    by_latency = search.exhaustive_space(SPACE, CountingScore(), toy_macs, latency=table,
                                         budget_ms=table(reference), progress=False)
    # Known answers by brute force over the whole space.
    assert by_macs.best.config == max((c for c in all_configs() if toy_macs(c) <= toy_macs(reference)),
                                      key=toy_accuracy)
    assert by_latency.best.config == max((c for c in all_configs() if table(c) <= table(reference)),
                                         key=toy_accuracy)
    assert by_latency.best.config != by_macs.best.config
    assert toy_macs(by_latency.best.config) > toy_macs(reference) >= by_macs.best.macs
    assert by_latency.best.latency_ms <= table(reference) and by_latency.best.accuracy > by_macs.best.accuracy
    # Results keep both costs; the latency front is over latency.
    assert all(e.latency_ms == table(e.config) and e.macs == toy_macs(e.config) for e in by_latency.evaluated)
    assert by_latency.budget_ms == table(reference) and by_latency.budget_macs is None
    assert [e.latency_ms for e in by_latency.pareto_latency] == sorted(e.latency_ms for e in by_latency.pareto_latency)
    assert by_macs.pareto_latency is None and by_macs.best.latency_ms is None
    # Both budgets at once: within each.
    both = search.exhaustive_space(SPACE, CountingScore(), toy_macs, toy_macs(reference), latency=table,
                                   budget_ms=table(reference), progress=False)
    assert all(e.macs <= toy_macs(reference) and e.latency_ms <= table(reference) for e in both.ranked)
    wide = search.bfs_space(SPACE, CountingScore(), toy_macs, latency=table, budget_ms=table(reference), beam=1000,
                            progress=False)
    assert wide.best.config == by_latency.best.config


@pytest.mark.parametrize("strategy", [search.exhaustive_space, search.bfs_space])
def test_latency_budget_below_the_fastest_configuration_is_a_clear_error(strategy):
    table = toy_latency()
    fastest = table.minimum(SPACE)
    assert fastest == pytest.approx(4.0)  # not the smallest sizes (b=1 is slow)
    assert table({n: s[0] for n, s in SPACE.items()}) > fastest
    with pytest.raises(ValueError, match=r"budget_ms=3.99 ms is below the smallest configuration's predicted "
                                         r"latency \(4 ms\)"):
        strategy(SPACE, CountingScore(), toy_macs, latency=table, budget_ms=3.99, progress=False)
    with pytest.raises(ValueError, match="budget_ms needs a latency table"):
        strategy(SPACE, CountingScore(), toy_macs, budget_ms=5.0, progress=False)
    with pytest.raises(ValueError, match="budget_ms must be a positive number"):
        strategy(SPACE, CountingScore(), toy_macs, latency=table, budget_ms=float("nan"), progress=False)
    assert len(strategy(SPACE, CountingScore(), toy_macs, latency=table, budget_ms=4.0, progress=False).ranked) >= 1


def test_resumed_search_takes_latency_from_the_table(tmp_path):
    path = str(tmp_path / "r.jsonl")
    first = search.exhaustive_space(SPACE, CountingScore(), toy_macs, 1500, results=path, progress=False)

    def must_not_run(configs):
        raise AssertionError("a resumed search re-evaluated a configuration")

    table = toy_latency()
    again = search.exhaustive_space(SPACE, must_not_run, toy_macs, 1500, results=path, latency=table, progress=False)
    assert [e.accuracy for e in again.ranked] == [e.accuracy for e in first.ranked]
    assert all(e.latency_ms == table(e.config) for e in again.ranked)


def _tiny_table(model, input_size=(3, 8, 8)):
    """A synthetic latency table for tiny_model in which layer '2' is slowest at group size 2."""
    from gross.latency import LatencyTable, describe_device, model_signature

    return LatencyTable({"2": {1: 0.5, 2: 3.0, 4: 0.6, 8: 0.9}, "4": {2: 0.4, 8: 1.0}}, 2.0,
                        device=describe_device("cpu"), input_size=input_size, batch_size=1, dtype="float32",
                        backward=False, model=model_signature(model))


def test_model_search_under_a_latency_budget(tmp_path):
    model = tiny_model()
    loader = tiny_loader(model)
    table = _tiny_table(model)
    budget = table({"2": 2, "4": 8})
    result = search.exhaustive(model, loader, (3, 8, 8), latency=table, budget_ms=budget, progress=False)
    assert {search.config_key(e.config) for e in result.ranked} == {
        search.config_key({"2": g2, "4": g4}) for g2 in (1, 2, 4, 8) for g4 in (2, 8)
        if table({"2": g2, "4": g4}) <= budget}
    macs = search.MacsTable(model, (3, 8, 8))
    assert all(e.macs == macs(e.config) and e.latency_ms == table(e.config) for e in result.evaluated)
    bfs = search.bfs(model, loader, (3, 8, 8), latency=table, budget_ms=budget, beam=100, progress=False)
    assert bfs.best.latency_ms <= budget
    with pytest.raises(ValueError, match=r"input size \[3, 8, 8\] in the table, \[3, 16, 16\] here"):
        search.exhaustive(model, loader, (3, 16, 16), latency=table, budget_ms=budget, progress=False)
    with pytest.raises(TypeError, match="LatencyTable"):
        search.exhaustive(model, loader, (3, 8, 8), latency={"2": 1}, progress=False)


def test_pareto_plot_shows_latency(tmp_path):
    from gross.plots import pareto_plot

    table = toy_latency()
    result = search.exhaustive_space(SPACE, CountingScore(), toy_macs, latency=table, progress=False)
    path = pareto_plot(str(tmp_path / "p.png"), result.evaluated,
                       [{"method": "uniform", "budget": "4", "macs": 1444, "latency_ms": 4.5, "search_val_acc": 0.8,
                         "test_acc_mean": 0.8, "test_acc_std": 0.0}])
    import matplotlib.image

    wide = matplotlib.image.imread(path)
    narrow = matplotlib.image.imread(pareto_plot(str(tmp_path / "q.png"), [search.Entry(c, toy_macs(c), 0.5)
                                                                           for c in all_configs()], []))
    assert wide.shape[1] == 2 * narrow.shape[1]  # a second panel: accuracy against latency


# --------------------------------------------------------------------------------------------
# Search over torchrun ranks

_SEARCH_SETUP = textwrap.dedent("""
    import torch
    from gross import data, search
    from test_search import _tiny_table, tiny_loader, tiny_model

    def run(sharded, results=None):
        torch.manual_seed(0)
        model = tiny_model()
        loader = tiny_loader(model, n=37, batch=8)  # 37: the shards differ in size
        if sharded:  # the validation set split across processes (one process: the whole set)
            loader = data.make_loaders(loader.dataset, loader.dataset, loader.dataset, 8)[1]
        table = _tiny_table(model)
        budget = table({"2": 4, "4": 8})
        full = search.exhaustive(model, loader, (3, 8, 8), latency=table, budget_ms=budget, configs_per_pass=3,
                                 results=results, progress=False)
        beam = search.bfs(model, loader, (3, 8, 8), latency=table, budget_ms=budget, beam=2, configs_per_pass=2,
                          progress=False)
        return {"exhaustive": [e.to_json() for e in full.evaluated], "ranked": [e.to_json() for e in full.ranked],
                "bfs": [e.to_json() for e in beam.evaluated]}
""")

_SEARCH_WORKER = _SEARCH_SETUP + textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from gross import distributed

    torch.set_num_threads(1)
    rank, world = distributed.init_from_env("gloo")
    assert world == 2
    out = {mode: run(mode == "batches", f"{sys.argv[1]}/{mode}.jsonl") for mode in ("batches", "configs")}
    model = tiny_model()
    shards = data.make_loaders(*[tiny_loader(model).dataset] * 3, 8)[1]
    try:
        search.evaluate(model, [{"2": 1, "4": 2}], shards, split="configs")
        raise AssertionError("split='configs' ran on a sharded loader")
    except ValueError as err:
        assert "whole validation set" in str(err)
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


@pytest.mark.usefixtures("one_thread")
def test_search_over_two_torchrun_processes_equals_one_process(tmp_path):
    run_torchrun(_SEARCH_WORKER, tmp_path, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    namespace = {}
    exec(_SEARCH_SETUP, namespace)
    single = namespace["run"](False)
    assert len(single["ranked"]) >= 2 and len({e["accuracy"] for e in single["exhaustive"]}) > 1
    for mode in ("batches", "configs"):
        for r in range(2):
            assert ranks[r][mode] == single, (mode, r)
        # One process wrote the results file: a header and one line per configuration.
        lines = (tmp_path / f"{mode}.jsonl").read_text().splitlines()
        assert len(lines) == 1 + len(single["exhaustive"])


def test_bad_split_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="split must be 'auto', 'batches' or 'configs'"):
        search.evaluate(model, [{"2": 1, "4": 2}], tiny_loader(model), split="rows")


def test_shared_prefix_survives_in_place_residual_adds():
    import torch.nn as nn
    from gross_kernels import SeriesConv2d

    class Counting(nn.Conv2d):
        computed = 0

        def forward(self, x):
            Counting.computed += 1
            return super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Residual(), _Residual(), Counting(8, 8, 3, padding=1),
                          SeriesConv2d(8, 4, 3, [1, 2, 4], bottleneck=(4, 4), stride=2, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    loader = tiny_loader(model, n=20, batch=10)
    # Only the last layer differs: everything before it, after both in-place adds, is computed once a batch.
    configs = [{"1.conv": 4, "2.conv": 8, "4": g} for g in (1, 2, 4)]
    Counting.computed = 0
    shared = search.evaluate(model, configs, loader)
    assert Counting.computed == 2
    assert shared == search.evaluate(model, configs, loader, share_prefixes=False)
