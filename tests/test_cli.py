"""The `gross` CLI: --help everywhere, one-line errors (exit 2) for user mistakes, every subcommand on a tiny run."""
import json
import os

import pytest
import torch

from gross import cli
from pipeline_helpers import tiny_demo_overrides

COMMANDS = ["train", "decompose", "train-space", "search", "finetune", "evaluate", "export", "reproduce", "demo"]

# The demo experiment shrunk to seconds: one epoch per stage and a 2·2 search space.
TINY = tiny_demo_overrides(1, "[16]", "{conv2: {group_sizes: [16, 32], bottleneck: 32}, "
                                      "conv3: {group_sizes: [16, 32], bottleneck: 32}}")


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--set" in out and "--out" in out and "--device" in out


def test_top_level_help_lists_commands_and_configs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in COMMANDS + ["four_layer_cifar10", "vgg16_high_compression"]:
        assert word in out


def test_shipped_configs_load_and_hold_the_recipes():
    names = cli.shipped_configs()
    assert set(names) >= {"four_layer_cifar10", "vgg16_cifar10", "vgg16_imagenet", "resnet18_imagenet",
                          "vgg16_high_compression", "demo"}
    for name in names:
        cfg = cli.load_config(name)
        from gross.experiment import Experiment
        Experiment(dict(cfg, device="cpu"))  # recipes, spec and model name all valid
    cfg = cli.load_config("four_layer_cifar10")
    assert (cfg["train"]["lr"], cfg["train"]["epochs"], cfg["train"]["milestones"]) == (0.1, 100, [50, 75])
    assert (cfg["search_space"]["lr"], cfg["search_space"]["milestones"]) == (1e-4, [80, 120])
    assert (cfg["finetune"]["lr"], cfg["finetune"]["milestones"]) == (1e-3, [80])


def test_overrides_parse_yaml_values():
    cfg = cli.load_config("demo", ["finetune.lr=0.5", "reproduce.budgets=[2, 8]", "data.root=null"],
                          device="cpu", out="x")
    assert cfg["finetune"]["lr"] == 0.5 and cfg["reproduce"]["budgets"] == [2, 8]
    assert cfg["data"]["root"] is None and cfg["out"] == "x" and cfg["device"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "no/such.yaml"], "neither a file nor a shipped config"),
    (["train", "--config", "demo", "--set", "train.epochs"], "expected key.sub=value"),
    (["train", "--config", "demo", "--set", "train.epoch=3"], "unknown keys ['train.epoch']"),
    (["train", "--config", "demo", "--set", "nosuch.x=1"], "nosuch is not a section"),
    (["train", "--config", "demo", "--set", "train.epochs=abc"], "epochs must be a positive int"),
    (["train", "--config", "demo", "--set", "model=alexnet"], "model must be one of"),
    (["train", "--config", "demo", "--device", "tpu"], "device must be"),
    (["decompose", "--config", "demo"], "run `gross train` first"),
    (["evaluate", "--config", "demo"], "does not exist"),
    (["finetune", "--config", "demo", "--group-config", "{conv9: 4}"], "unknown layers ['conv9']"),
    (["finetune", "--config", "demo", "--group-config", "3"], "group_size 3 is not available"),
    (["finetune", "--config", "demo", "--group-config", "{conv2: [4"], "not valid YAML"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code, out, err = run(capsys, *argv, "--out", str(tmp_path), "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_yaml_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: four_layer\n  data: [\n")
    code, _, err = run(capsys, "train", "--config", str(path))
    assert code == 2 and "not valid YAML" in err and err.count("\n") == 1
    path.write_text("model: four_layer\n")
    code, _, err = run(capsys, "train", "--config", str(path))
    assert code == 2 and "missing keys" in err


def test_every_subcommand_on_a_tiny_run(tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    common = ["--config", "demo", "--out", out_dir, *TINY]

    code, out, _ = run(capsys, "train", *common)
    assert code == 0 and os.path.isfile(os.path.join(out_dir, "base.pt"))

    code, out, _ = run(capsys, "decompose", *common)
    assert code == 0 and "largest configuration" in out and os.path.isfile(os.path.join(out_dir, "series_init.pt"))

    code, out, _ = run(capsys, "train-space", *common)
    assert code == 0 and os.path.isfile(os.path.join(out_dir, "series.pt"))

    code, out, err = run(capsys, "search", *common, "--budget", "1")
    assert code == 2 and "below the smallest configuration" in err
    code, out, _ = run(capsys, "search", *common, "--budget-config", "32")
    assert code == 0 and "4 configurations within budget" in out and "| 1 | " in out
    summary = json.load(open(os.path.join(out_dir, "search_result.json")))
    assert len(summary["ranked"]) == 4 and summary["pareto"]

    code, out, _ = run(capsys, "finetune", *common, "--group-config", "{conv2: 16, conv3: 32}")
    assert code == 0 and "16-32 run 1" in out and "test" in out

    code, out, _ = run(capsys, "evaluate", *common, "--group-config", "16")
    assert code == 0
    scores = json.loads(out.strip().splitlines()[-1])
    assert 0 <= scores["test_acc"] <= 1 and scores["macs"] > 0
    code, out, _ = run(capsys, "evaluate", *common, "--group-config", "16", "--verbose")
    assert code == 0 and "| signature | winner |" in out and "G=16" in out and "inference" in out

    code, out, _ = run(capsys, "export", *common, "--group-config", "16", "--format", "pt,program")
    assert code == 0
    from gross import export
    plain = export.load(os.path.join(out_dir, "exported", "16.pt"))
    assert os.path.isfile(os.path.join(out_dir, "exported", "16.pt2"))
    program = torch.export.load(os.path.join(out_dir, "exported", "16.pt2"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), plain(x))

    code, out, _ = run(capsys, "reproduce", *common)
    assert code == 0 and "| 16 | uniform | 16-16 |" in out and "| 16 | searched |" in out
    for name in ("table.md", "results.csv", "results.json", "pareto.png", "search.jsonl"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0

    # Reusing the folder with other settings is allowed but said.
    code, out, _ = run(capsys, "train", *common, "--set", "finetune.lr=0.5")
    assert code == 0 and "warning:" in out and "finetune.lr" in out


def test_reproduce_with_bfs_search(tmp_path, capsys):
    out_dir = str(tmp_path / "bfs")
    code, out, _ = run(capsys, "reproduce", "--config", "demo", "--out", out_dir, *TINY,
                       "--set", "search.strategy=bfs", "--set", "search.beam=1", "--set", "reproduce.budgets=[16, 32]")
    assert code == 0 and "| 16 | uniform | 16-16 |" in out and "| 32 | searched |" in out
    results = json.load(open(os.path.join(out_dir, "results.json")))
    assert all(r["macs"] <= results["rows"][2 * (i // 2)]["macs"] for i, r in enumerate(results["rows"]))


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the key and the rule, exit status 2, nothing written or overwritten

def _folder(tmp_path, layout):
    from PIL import Image

    for split, classes in layout.items():
        for c in classes:
            (tmp_path / "images" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / c / "x.png")
    return ["--config", "imagefolder", "--data-root", str(tmp_path / "images")]


DEMO = ["--config", "demo"]
NET = ["--config", "demo", "--set", "model=python:user_nets:small_net", "--set", "decompose.spec=auto"]
BAD_INPUTS = {
    "model string": (DEMO + ["--set", "model=torchvision:resnet5000"],
                     "model 'torchvision:resnet5000': 'resnet5000' is not a torchvision classification model"),
    "model form": (DEMO + ["--set", "model=keras:resnet50"], "model must be one of the paper's networks"),
    "factory": (DEMO + ["--set", "model=python:user_nets:missing"], "module 'user_nets' has no callable 'missing'"),
    "factory module": (DEMO + ["--set", "model=python:no_such_module_xyz:net"], "'no_such_module_xyz' cannot be imported"),
    "factory kwargs": (NET + ["--set", "model_kwargs={depth: 3}"], "the factory refused model_kwargs {'depth': 3}"),
    "timm": (DEMO + ["--set", "model=timm:resnet18"], "needs the optional package timm"),
    "weights": (DEMO + ["--set", "weights=no/such/file.pt"], "weights for 'four_layer' must be an existing file"),
    "spec layer": (DEMO + ["--set", "decompose.spec={conv9: {group_sizes: [1, 2]}}"],
                   "decompose.spec: spec names layer 'conv9', which is not in the model"),
    "spec not a conv": (DEMO + ["--set", "decompose.spec={fc1: {group_sizes: [1]}}"],
                        "decompose.spec['fc1']: the layer is a Linear, not a k×k convolution (k > 1)"),
    "spec 1×1": (NET + ["--set", "decompose.spec={'7': {group_sizes: [1]}}"],
                 "decompose.spec['7']: the layer is a 1×1 convolution, not a k×k convolution (k > 1)"),
    "spec grouped": (NET + ["--set", "decompose.spec={'5': {group_sizes: [1]}}"],
                     "decompose.spec: layer '5': conv must be an ungrouped convolution (groups=1), got groups=32"),
    "group sizes": (DEMO + ["--set", "decompose.spec={conv2: {group_sizes: [3, 6], bottleneck: 32}}"],
                    "decompose.spec: layer 'conv2': group_sizes: every group size must divide the bottleneck S=32, "
                    "3 does not"),
    "group sizes nested": (DEMO + ["--set", "decompose.spec={conv2: {group_sizes: [4, 2]}}"],
                           "decompose.spec: layer 'conv2': group_sizes must be strictly increasing"),
    "spec file": (DEMO + ["--set", "decompose.spec=no_such_spec.yaml"], "(no such file)"),
    "auto chain": (DEMO + ["--set", "decompose.auto.group_sizes=[2, 3]"],
                   "decompose.auto.group_sizes must be a nested chain (increasing, each dividing the next)"),
    "auto finds nothing": (NET + ["--set", "decompose.auto.min_channels=64"],
                           "auto finds no convolution to decompose in 'python:user_nets:small_net'"),
    "input too small": (DEMO + ["--set", "data.input_size=[3, 16, 16]"],
                        "data.input_size [3, 16, 16]: model 'four_layer' cannot run on it"),
    "input channels": (DEMO + ["--set", "data.input_size=[4, 32, 32]"], "data.input_size must be [C, H, W] with C 1 or 3"),
    "one class": (lambda tmp: _folder(tmp, {"train": ["a"], "val": ["a"]}),
                  "an image folder needs at least two classes under train/, found 1"),
    "missing split": (lambda tmp: _folder(tmp, {"train": ["a", "b"]}), "has no split folder 'val'"),
    "search split too big": (lambda tmp: _folder(tmp, {"train": ["a", "b"], "val": ["a", "b"]}) + [
        "--set", "data.search_per_class=1"], "data.search_per_class=1: class 0 has only 1 training images"),
    "search split of CIFAR-10's kind": (DEMO + ["--set", "data.search_per_class=10"],
                                        "data.search_per_class must be null for embedded"),
    "dataset": (DEMO + ["--set", "data.name=mnist"], "data.name must be one of ['embedded', 'cifar10', 'cifar100'"),
    "recipe": (DEMO + ["--set", "finetune.lr=-1"], "finetune.lr must be a positive number, got -1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(case, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as where timm is not installed
    args, message = BAD_INPUTS[case]
    args = args(tmp_path) if callable(args) else args
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's file")
    code, _, err = run(capsys, "reproduce", *args, "--out", str(out), "--quiet", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "an earlier run's file"


def test_a_diverging_run_names_stage_epoch_step_and_lr(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--config", "demo", "--out", str(tmp_path), "--quiet", "--set", "train.lr=20",
                       "--set", "data.limit=300")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("gross train: error: train (run 1 of 1): the loss is nan at epoch 1, step ")
    assert "(lr 20): training stopped" in err and not (tmp_path / "base.pt").exists()
