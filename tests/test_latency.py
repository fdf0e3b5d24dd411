"""gross.latency: a CPU profile of the 4-layer net, the prediction check on known timings, the table file, bad input, the CLI."""
import json
import math
import os
import statistics

import pytest
import torch

from gross import latency, search
from gross.config import get_config, set_config
from pipeline_helpers import one_thread, series_four_layer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
INPUT = (3, 32, 32)


@pytest.fixture(scope="module")
def four_layer_table():
    """A real CPU profile of the (randomly initialised) 4-layer series net, few repeats."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = series_four_layer()
    set_config(model, {"conv2": 4, "conv3": 2, "conv4": 16})
    table = latency.profile(model, INPUT, repeats=3, warmup=1, checks=4)
    torch.set_num_threads(before)
    return model, table


def test_cpu_profile_of_the_four_layer_net(four_layer_table):
    model, table = four_layer_table
    space = search.config_space(model)
    assert {n: sorted(s) for n, s in table.per_layer.items()} == {n: sorted(s) for n, s in space.items()}
    assert all(ms > 0 for sizes in table.per_layer.values() for ms in sizes.values())
    assert math.isfinite(table.rest)
    assert table.device == {"type": "cpu", "name": latency.describe_device("cpu")["name"], "threads": 1}
    assert (table.batch_size, table.dtype, table.backward, table.input_size) == (1, "float32", False, list(INPUT))
    assert table.versions["torch"] == torch.__version__
    # The model is left as it was: same configuration, its own forward, its own dtype.
    assert get_config(model) == {"conv2": 4, "conv3": 2, "conv4": 16}
    assert all("forward" not in vars(m) for m in model.modules())
    config = {"conv2": 1, "conv3": 32, "conv4": 8}
    assert table(config) == pytest.approx(table.rest + sum(table.per_layer[n][g] for n, g in config.items()))
    rows = table.prediction["configs"]
    assert len(rows) == 4 and len({search.config_key(r["config"]) for r in rows}) == 4
    for r in rows:
        assert r["measured_ms"] > 0
        assert r["predicted_ms"] == pytest.approx(table(r["config"]))
        assert r["error_pct"] == pytest.approx(100 * (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
    # The references (every layer at its j-th size) fit the rest and are not among the checked ones.
    references = {search.config_key(r["config"]) for r in table.prediction["references"]}
    assert len(references) == 7 and not references & {search.config_key(r["config"]) for r in rows}
    table.check(model=model, input_size=INPUT, device="cpu", batch_size=1, dtype=torch.float32, backward=False)


def test_profile_with_the_cpu_timer():
    table = latency.profile(series_four_layer(), INPUT, repeats=2, warmup=0, checks=2, timer="cpu")
    assert table.settings["timer"] == "cpu" and all(ms > 0 for s in table.per_layer.values() for ms in s.values())
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="timer='cpu' times one CPU thread.*2 threads"):
        latency.profile(series_four_layer(), INPUT, timer="cpu")


def test_profile_forward_backward_in_another_dtype():
    model = series_four_layer()
    table = latency.profile(model, INPUT, batch_size=2, dtype="float64", backward=True, repeats=1, warmup=0,
                            checks=1)
    assert (table.batch_size, table.dtype, table.backward) == (2, "float64", True)
    assert len(table.prediction["configs"]) == 1
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="backward True in the table, False here"):
        table.check(backward=False)


def _known_measure(true_layer, true_rest, interaction):
    """A stand-in for the round-robin timer: layer items cost `true_layer`, whole models the sum plus
    `true_rest` plus `interaction(config)`, so the table and its errors are known exactly."""
    def measure(items, *args, **kwargs):
        out = {}
        for key, prepare, run in items:
            prepare()
            run()  # every item still runs once: the profile's modules and inputs fit together
            if isinstance(key[0], str):
                out[key] = true_layer[key[0]][key[1]]
            else:
                config = dict(key)
                out[key] = true_rest + sum(true_layer[n][g] for n, g in config.items()) + interaction(config)
        return out
    return measure


def test_prediction_check_reports_the_non_additive_part(monkeypatch):
    model = series_four_layer()
    space = search.config_space(model)
    true_layer = {n: {g: 0.1 * (i + 1) + 0.01 * g for g in sizes} for i, (n, sizes) in enumerate(space.items())}
    # Exactly additive: the rest is recovered and every error is zero.
    monkeypatch.setattr(latency, "_measure", _known_measure(true_layer, 0.7, lambda c: 0.0))
    exact = latency.profile(model, INPUT, checks=5)
    assert exact.rest == pytest.approx(0.7)
    assert exact.per_layer == true_layer
    assert exact.prediction["median_abs_error_pct"] == pytest.approx(0, abs=1e-9)
    # Whole models slower by 0.1 ms whenever conv2 runs at 1 (not so in any reference but the first).
    slow = lambda c: 0.1 if c["conv2"] == 1 and c["conv3"] != 1 else 0.0  # noqa: E731
    monkeypatch.setattr(latency, "_measure", _known_measure(true_layer, 0.7, slow))
    table = latency.profile(model, INPUT, checks=20, seed=3)
    assert table.rest == pytest.approx(0.7)
    errors = []
    for r in table.prediction["configs"]:
        measured = 0.7 + sum(true_layer[n][g] for n, g in r["config"].items()) + slow(r["config"])
        assert r["measured_ms"] == pytest.approx(measured)
        errors.append(100 * (table(r["config"]) - measured) / measured)
        assert r["error_pct"] == pytest.approx(errors[-1])
    assert any(errors) and min(errors) < 0
    assert table.prediction["median_abs_error_pct"] == pytest.approx(statistics.median(map(abs, errors)))
    assert table.prediction["worst_error_pct"] == pytest.approx(min(errors))


def test_table_file_round_trip(tmp_path, four_layer_table):
    model, table = four_layer_table
    path = table.save(str(tmp_path / "sub" / "latency.json"))
    loaded = latency.LatencyTable.load(path)
    assert loaded.to_json() == table.to_json()
    assert loaded({"conv2": 2, "conv3": 8, "conv4": 64}) == table({"conv2": 2, "conv3": 8, "conv4": 64})
    assert json.loads((tmp_path / "sub" / "latency.json").read_text())["device"]["type"] == "cpu"
    assert "prediction checked on 4 random configurations" in latency.format_table(loaded)
    assert 0 < table.settings["cpu_share"] and "warning" not in latency.format_table(
        _edited(tmp_path, table, lambda o: o["settings"].update(cpu_share=0.95)))
    busy = _edited(tmp_path, table, lambda o: o["settings"].update(cpu_share=0.5))
    assert "warning: the profile got 50 % of its threads' CPU time" in latency.format_table(busy)


# --------------------------------------------------------------------------------------------
# Bad input

def _edited(tmp_path, table, edit):
    obj = table.to_json()
    edit(obj)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(obj))
    return latency.LatencyTable.load(str(path))


def test_table_from_another_device_is_refused(tmp_path, four_layer_table):
    model, table = four_layer_table
    other = _edited(tmp_path, table, lambda o: o["device"].update(name="Pretend CPU 9000", threads=64))
    with pytest.raises(ValueError, match=r"device name 'Pretend CPU 9000' in the table, .* here; "
                                         r"device threads 64 in the table, 1 here"):
        other.check(model=model, input_size=INPUT, device="cpu")
    gpu = _edited(tmp_path, table, lambda o: o["device"].update(type="cuda"))
    with pytest.raises(ValueError, match="device type 'cuda' in the table"):
        gpu.check(device="cpu")


def test_table_from_another_model_or_input_size_is_refused(four_layer_table):
    import torch.nn as nn
    from gross_kernels import SeriesConv2d

    model, table = four_layer_table
    with pytest.raises(ValueError, match=r"input size \[3, 32, 32\] in the table, \[3, 64, 64\] here"):
        table.check(model=model, input_size=(3, 64, 64))
    narrower = series_four_layer()
    narrower.conv3 = SeriesConv2d(32, 64, 3, [1, 2, 4], padding=1)
    with pytest.raises(ValueError, match=r"layer conv3: group_sizes \[1, 2, 4, 8, 16, 32\] in the table, \[1, 2, 4\]"):
        table.check(model=narrower)
    wider_fc = series_four_layer()
    wider_fc.fc2 = nn.Linear(256, 100)
    with pytest.raises(ValueError, match="the rest of the network differs"):
        table.check(model=wider_fc)
    fewer = series_four_layer()
    fewer.conv4 = nn.Conv2d(64, 64, 3, padding=1)
    with pytest.raises(ValueError, match=r"series layers differ \(only in the table: \['conv4'\]"):
        table.check(model=fewer)


def test_missing_or_malformed_table_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latency table at .*gross profile"):
        latency.LatencyTable.load(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a gross latency table"):
        latency.LatencyTable.load(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"format": latency.FORMAT, "rest_ms": 1}))
    with pytest.raises(ValueError, match="malformed latency table"):
        latency.LatencyTable.load(str(tmp_path / "other.json"))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"repeats": 0}, "repeats must be an int >= 1"),
    ({"checks": -1}, "checks must be an int >= 0"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"warmup": -1}, "warmup must be an int >= 0"),
    ({"timer": "tsc"}, "timer must be one of"),
    ({"device": "meta"}, "device must be 'cpu' or 'cuda"),
])
def test_bad_profile_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latency.profile(series_four_layer(), INPUT, **kwargs)


def test_profile_needs_series_layers_and_a_valid_input_size():
    from gross import models

    with pytest.raises(ValueError, match="no SeriesConv2d layers"):
        latency.profile(models.build("four_layer"), INPUT)
    with pytest.raises(ValueError, match="input_size"):
        latency.profile(series_four_layer(), (32, 32))


# --------------------------------------------------------------------------------------------
# The CLI: `gross profile`, `gross search --latency-ms / --latency-of`

def test_cli_profile_and_latency_search(tmp_path, capsys):
    from gross import cli
    from pipeline_helpers import tiny_demo_overrides

    def run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    out_dir = str(tmp_path / "run")
    common = ["--config", "demo", "--out", out_dir,
              *tiny_demo_overrides(1, "[16]", "{conv2: {group_sizes: [4, 16, 32], bottleneck: 32}, "
                                              "conv3: {group_sizes: [16, 32], bottleneck: 32}}")]
    quick = ["--set", "latency.repeats=2", "--set", "latency.warmup=0", "--set", "latency.checks=2"]
    code, out, err = run("search", *common, "--latency-ms", "5")
    assert code == 2 and "does not exist" in err  # no trained search space yet
    for stage in ("train", "decompose", "train-space"):
        assert run(stage, *common)[0] == 0
    code, out, err = run("search", *common, "--latency-of", "16")
    assert code == 2 and "no latency table at" in err and "gross profile" in err and err.count("\n") == 1

    code, out, _ = run("profile", *common, *quick)
    path = os.path.join(out_dir, "latency.json")
    assert code == 0 and f"latency table: {path}" in out and "| conv2 | 4: " in out
    assert "prediction checked on 2 random configurations" in out
    table = latency.LatencyTable.load(path)
    assert sorted(table.per_layer["conv2"]) == [4, 16, 32]

    code, out, _ = run("search", *common, "--latency-of", "16")
    assert code == 0 and "| rank | configuration | MACs | latency (ms) | val acc |" in out
    summary = json.load(open(os.path.join(out_dir, "search_result.json")))
    budget = table({"conv2": 16, "conv3": 16})
    assert summary["budget_ms"] == pytest.approx(budget) and summary["latency_table"] == path
    within = [c for c in ({"conv2": a, "conv3": b} for a in (4, 16, 32) for b in (16, 32)) if table(c) <= budget]
    assert len(summary["ranked"]) == len(within) and all(e["latency_ms"] <= budget for e in summary["ranked"])
    assert os.path.getsize(os.path.join(out_dir, "search_pareto.png")) > 0
    # Both budgets at once, given as config keys.
    code, out, _ = run("search", *common, "--budget-config", "32", "--set", f"search.latency_ms={budget}")
    assert code == 0 and "within budget" in out and " MACs and " in out

    # Bad input: one line, exit 2, nothing written.
    before = os.path.getmtime(os.path.join(out_dir, "search_result.json"))
    code, _, err = run("search", *common, "--latency-ms", "1e-6")
    assert code == 2 and "below the smallest configuration's predicted latency" in err
    code, _, err = run("search", *common, "--latency-ms", "5", "--latency-of", "16")
    assert code == 2 and "not both" in err
    code, _, err = run("search", *common, "--latency-ms", "5", "--set", "latency.batch_size=8")
    assert code == 2 and "batch_size 1 in the table, 8 here" in err
    obj = json.load(open(path))
    obj["device"]["name"] = "Pretend CPU 9000"
    with open(path, "w") as f:
        json.dump(obj, f)
    code, _, err = run("search", *common, "--latency-ms", "5")
    assert code == 2 and "device name 'Pretend CPU 9000' in the table" in err and err.count("\n") == 1
    assert os.path.getmtime(os.path.join(out_dir, "search_result.json")) == before


def test_cli_profile_help(capsys):
    from gross import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["profile", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--checkpoint" in out and "latency" in out
