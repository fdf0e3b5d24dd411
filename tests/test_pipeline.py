"""A whole `gross reproduce` on a tiny ImageFolder made here, with a torchvision model and with a user factory."""
import json
import os

import pytest
import torch

from gross import cli, export, models
from pipeline_helpers import one_thread, tiny_image_folder  # noqa: F401


def _tiny(include, sizes, budget):
    """Overrides that shrink the imagefolder config to seconds: one epoch per stage, two runs, a 2·2 space."""
    return ["--quiet", "--device", "cpu", "--set", "data.input_size=[3, 32, 32]", "--set", "data.search_per_class=2",
            "--set", "data.workers=0", "--set", "data.eval_batch_size=64", "--set", "decompose.workers=1",
            "--set", "decompose.max_iter=3", "--set", f"decompose.auto.include={include}",
            "--set", f"decompose.auto.group_sizes={sizes}", "--set", "search.strategy=exhaustive",
            "--set", f"reproduce.budgets=[{budget}]", "--set", "reproduce.runs=2",
            *[arg for stage in ("train", "search_space", "finetune")
              for arg in ("--set", f"{stage}.epochs=1", "--set", f"{stage}.milestones=[]",
                          "--set", f"{stage}.batch_size=16")]]


def _weights_file(tmp_path):
    """A local weights file for torchvision's resnet18 with 3 classes (a user's network trained elsewhere).

    An untrained one: a from-scratch ResNet trained for a few steps on a dozen images has batch-norm
    statistics so far from its weights' that its eval-mode outputs overflow.
    """
    path = tmp_path / "resnet18.pt"
    torch.save(models.build("torchvision:resnet18", num_classes=3).state_dict(), path)
    return ["--set", f"weights={path}"]


@pytest.mark.parametrize("model, extra, layers", [
    ("torchvision:resnet18", [_weights_file, *_tiny("[layer1.0.*]", "[16, 32]", 32)],
     ["layer1.0.conv1", "layer1.0.conv2"]),
    ("python:user_nets:small_net", ["--set", "model_kwargs={width: 8}", "--set", "decompose.auto.min_channels=8",
                                    *_tiny("['*']", "[4, 8]", 8)], ["2", "9"]),
])
def test_reproduce_on_an_image_folder(model, extra, layers, tmp_path, capsys, one_thread):
    folder = tiny_image_folder(tmp_path / "images", classes=3, train=8, val=4)
    out = tmp_path / "run"
    extra = [arg for item in extra for arg in (item(tmp_path) if callable(item) else [item])]
    code = cli.main(["reproduce", "--config", "imagefolder", "--data-root", str(folder), "--out", str(out),
                     "--set", f"model={model}", *extra])
    printed, errors = capsys.readouterr()
    assert code == 0, errors
    assert "| budget | method | configuration | MACs |" in printed and "| searched − uniform |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["uniform", "searched"]
    assert all(len(r["test_accs"]) == 2 for r in results["rows"]) and len(results["comparisons"]) == 1
    assert len(results["searched"]) == 4  # the whole 2·2 space was evaluated on the search split
    settings = json.loads((out / "experiment.json").read_text())
    assert settings["model"] == model and settings["data"]["search_per_class"] == 2

    # Every model file the run wrote rebuilds from its own record, whatever the model's source.
    x = torch.randn(2, 3, 32, 32)
    for name, decomposed in (("base.pt", False), ("series_init.pt", True), ("series.pt", True)):
        loaded, record = models.load(out / name)
        assert record.model == model and record.num_classes == 3
        assert (list(record.spec or {}) == layers) == decomposed
        assert loaded.eval()(x).shape == (2, 3)
    for row in results["rows"]:
        plain = export.load(out / row["exported"])
        assert plain.eval()(x).shape == (2, 3)
        assert not any(type(m).__module__.startswith("gross_kernels") for m in plain.modules())
    assert os.path.isfile(out / "pareto.png")


def test_a_configuration_alone_is_the_fresh_series_at_that_configuration():
    # Fine-tuning starts from each layer's term at its size, taken from the series decomposition:
    # the same function as decomposing the conv at that size alone (the partial sums are its BTD).
    from gross.decompose import series
    from gross.decompose.layer import single_term

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1, stride=2)
    x = torch.randn(2, 16, 9, 9)
    layer = series(conv, [2, 4, 16], tol=1e-4)
    for g in (2, 4, 16):
        alone, term = series(conv, [g], tol=1e-4), single_term(layer, g)
        assert term.group_sizes == (g,) and layer.group_size == 16  # the series itself is left as it was
        with torch.no_grad():
            torch.testing.assert_close(term(x), alone(x), rtol=1e-4, atol=1e-5)
