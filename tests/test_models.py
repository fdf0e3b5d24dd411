"""gross.models: the four networks, their initialisation, layer names and decomposition specs."""
import math

import pytest
import torch
import torch.nn as nn

from gross import checkpoint, models


def _module(model, name):
    return dict(model.named_modules())[name]


@pytest.mark.parametrize("name,size,classes", [("four_layer", 32, 10), ("vgg16_cifar", 32, 10),
                                               ("vgg16_imagenet", 32, 1000), ("resnet18", 64, 1000)])
def test_build_output_shapes(name, size, classes):
    model = models.build(name)
    assert model(torch.randn(2, 3, size, size)).shape == (2, classes)
    assert models.build(name, num_classes=7)(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_four_layer_structure():
    model = models.build("four_layer")
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    assert convs == [(3, 32, (3, 3), (1, 1)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)),
                     (64, 64, (3, 3), (1, 1))]
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)] == [
        (256, 256), (256, 10)]


def test_vgg16_cifar_structure():
    model = models.build("vgg16_cifar")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(512, 512), (512, 10)]
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2


def test_initialisation_follows_appendix():
    torch.manual_seed(1)
    model = models.build("vgg16_cifar")
    conv = _module(model, models.module_name("vgg16_cifar", "conv4_2"))  # 512 → 512, 3×3
    expected = math.sqrt(2.0 / (conv.out_channels * 9))  # He-normal, fan_out, ReLU gain
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)
    fc = model.classifier[1]
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert fc.weight.mean().abs().item() < 1e-3
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
    wide = models.build("vgg16_cifar", fc_std=0.1)  # the appendix's "variance 0.01" reading
    assert wide.classifier[1].weight.std().item() == pytest.approx(0.1, rel=0.02)


def test_human_names_map_to_convs():
    vgg = models.build("vgg16_cifar")
    names = models.HUMAN_NAMES["vgg16_cifar"]
    assert len(names) == 13
    assert names["conv1_1"] == "features.0" and names["conv1_2"] == "features.2"
    assert names["conv2_1"] == "features.5" and names["conv5_3"] == "features.28"
    assert _module(vgg, names["conv3_1"]).in_channels == 128 and _module(vgg, names["conv3_1"]).out_channels == 256
    assert models.HUMAN_NAMES["vgg16_imagenet"] == names  # same trunk indices as torchvision
    assert models.module_name("four_layer", "conv3") == "conv3"
    assert models.module_name("vgg16_cifar", "features.7") == "features.7"  # module names pass through


def _valid(spec, model):
    for name, entry in spec.items():
        conv = _module(model, name)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3), name
        bottleneck = entry["bottleneck"]
        s, t = (conv.in_channels,) * 2 if bottleneck is None else (
            (bottleneck,) * 2 if isinstance(bottleneck, int) else tuple(bottleneck))
        sizes = entry["group_sizes"]
        assert sizes == sorted(set(sizes)), name
        assert all(b % a == 0 for a, b in zip(sizes, sizes[1:])), name
        assert all(s % g == 0 and t % (s // g) == 0 for g in sizes), name


def test_default_specs():
    four = models.default_spec("four_layer")
    assert four == {"conv2": {"group_sizes": [1, 2, 4, 8, 16, 32], "bottleneck": 32},
                    "conv3": {"group_sizes": [1, 2, 4, 8, 16, 32], "bottleneck": 32},
                    "conv4": {"group_sizes": [1, 2, 4, 8, 16, 32, 64], "bottleneck": 64}}
    _valid(four, models.build("four_layer"))
    vgg = models.default_spec("vgg16_cifar")
    assert len(vgg) == 12 and models.HUMAN_NAMES["vgg16_cifar"]["conv1_1"] not in vgg
    assert all(e["group_sizes"] == [1, 4, 16, 32] for e in vgg.values())
    _valid(vgg, models.build("vgg16_cifar"))
    assert models.default_spec("vgg16_imagenet") == vgg
    resnet = models.default_spec("resnet18")
    assert len(resnet) == 16 and "layer2.0.conv1" in resnet and "conv1" not in resnet
    _valid(resnet, models.build("resnet18"))


def test_high_compression_spec_is_valid():
    spec = models.high_compression_spec()
    names = models.HUMAN_NAMES["vgg16_imagenet"]
    assert spec[names["conv3_2"]] == {"group_sizes": [15, 30, 60], "bottleneck": [60, 48]}
    assert spec[names["conv1_2"]] == {"group_sizes": [11], "bottleneck": [11, 18]}
    assert len(spec) == 12
    _valid(spec, models.VGG16CIFAR())  # same trunk module names and shapes as the ImageNet VGG-16
    config = models.high_compression_config()
    assert config[names["conv4_3"]] == 33 and config[names["conv5_1"]] == 56
    assert all(config[name] in entry["group_sizes"] for name, entry in spec.items())


def test_weights_from_local_files(tmp_path):
    model = models.build("four_layer")
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": model.state_dict()}, wrapped)
    ours = tmp_path / "ours.pt"
    checkpoint.save_weights(ours, model)
    for path in (plain, wrapped, ours):
        loaded = models.build("four_layer", weights=str(path))
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        models.build("vgg19")
    with pytest.raises(ValueError, match="num_classes"):
        models.build("four_layer", num_classes=0)
    with pytest.raises(ValueError, match="existing file"):
        models.build("four_layer", weights="/nonexistent/weights.pt")
    with pytest.raises(ValueError, match="torchvision weights name"):
        models.build("resnet18", weights="NOT_A_WEIGHT")
    with pytest.raises(TypeError, match="weights"):
        models.build("four_layer", weights=3)
    with pytest.raises(ValueError, match="name must be one of"):
        models.default_spec("alexnet")


# --------------------------------------------------------------------------------------------
# Any model: torchvision, timm, the user's own factories; model files that rebuild them all

import sys  # noqa: E402
import types  # noqa: E402

import torchvision  # noqa: E402

import user_nets  # noqa: E402
from gross.config import set_config  # noqa: E402
from gross.decompose import convert  # noqa: E402


def test_torchvision_source_builds_any_classification_model():
    model = models.build("torchvision:resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    slim = models.build("torchvision:mobilenet_v2", num_classes=3, kwargs={"width_mult": 0.5})
    assert slim.features[0][0].out_channels == 16  # 32 × width_mult
    assert slim.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_torchvision_weights_resolve_by_name_without_download():
    weights = torchvision.models.ResNet50_Weights
    assert models.check_weights("torchvision:resnet50", "IMAGENET1K_V2") is weights.IMAGENET1K_V2
    assert models.check_weights("torchvision:resnet50", "ResNet50_Weights.DEFAULT") is weights.DEFAULT
    assert models.check_weights("resnet18", "IMAGENET1K_V1") is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert models.check_weights("four_layer", None) is None
    with pytest.raises(ValueError, match="neither an existing file nor a torchvision weights name"):
        models.check_weights("torchvision:resnet50", "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="must be an existing file"):
        models.check_weights("python:user_nets:small_net", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match="num_classes must be 1000 with torchvision weights"):
        models.build("torchvision:resnet18", num_classes=10, weights="IMAGENET1K_V1")  # refused before downloading


def test_python_factory_gets_kwargs_and_num_classes():
    model = models.build("python:user_nets:small_net", num_classes=4, kwargs={"width": 8})
    assert model[0].out_channels == 8 and model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    models.check_input(model, "python:user_nets:small_net", (3, 16, 16), 4)
    # A factory without a num_classes keyword is called without it; the output check catches a mismatch.
    headless = models.build("python:user_nets:headless_net", num_classes=3)
    with pytest.raises(ValueError, match=r"output must be \(batch, 3\).*num_classes keyword"):
        models.check_input(headless, "python:user_nets:headless_net", (3, 16, 16), 3)
    with pytest.raises(ValueError, match="refused model_kwargs"):
        models.build("python:user_nets:small_net", kwargs={"depth": 3})


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match=r"data.input_size \[3, 16, 16\]: model 'four_layer' cannot run on it"):
        models.check_input(models.build("four_layer"), "four_layer", (3, 16, 16), 10)


def test_timm_without_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ValueError, match=r"needs the optional package timm \(pip install timm\)"):
        models.build("timm:resnet18")


def _fake_timm(monkeypatch, calls):
    """A stand-in `timm` module (timm is not installed here): it checks our calls, not timm itself."""
    fake = types.ModuleType("timm")
    fake.is_model = lambda name: name == "tiny_net"

    def create_model(name, pretrained=True, **kwargs):
        calls.append((name, pretrained, kwargs))
        return user_nets.small_net(**kwargs)

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)


def test_timm_source_calls_create_model(monkeypatch):
    calls = []
    _fake_timm(monkeypatch, calls)
    model = models.build("timm:tiny_net", num_classes=6, kwargs={"width": 8})
    assert calls == [("tiny_net", False, {"num_classes": 6, "width": 8})]  # never pretrained: no download
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 6)
    with pytest.raises(ValueError, match="timm has no model 'nope'"):
        models.build("timm:nope")


@pytest.mark.parametrize("source, message", [
    ("torchvision:resnet5000", "'resnet5000' is not a torchvision classification model"),
    ("torchvision:fasterrcnn_resnet50_fpn", "is not a torchvision classification model"),
    ("python:user_nets", "name must be one of"),
    ("python:no_such_module_xyz:net", "module 'no_such_module_xyz' cannot be imported"),
    ("python:user_nets:missing", "has no callable 'missing'"),
    ("python:user_nets:NOT_A_FACTORY", "has no callable 'NOT_A_FACTORY'"),
    ("tensorflow:resnet", "name must be one of"),
])
def test_bad_model_strings(source, message):
    with pytest.raises(ValueError, match=message):
        models.build(source)


def test_paper_networks_take_no_kwargs():
    with pytest.raises(ValueError, match="model_kwargs must be empty"):
        models.build("four_layer", kwargs={"width": 2})


def _every_source(monkeypatch):
    _fake_timm(monkeypatch, [])
    return [("four_layer", {}, 10, {"conv3": {"group_sizes": [8, 32], "bottleneck": 32}}),
            ("torchvision:resnet18", {}, 5, {"layer1.0.conv2": {"group_sizes": [16, 64], "bottleneck": 64}}),
            ("python:user_nets:small_net", {"width": 8}, 3, {"9": {"group_sizes": [4, 16], "bottleneck": 16}}),
            ("timm:tiny_net", {"width": 8}, 4, {"2": {"group_sizes": [2, 8], "bottleneck": 8}})]


def test_model_files_rebuild_every_source(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    for i, (source, kwargs, classes, spec) in enumerate(_every_source(monkeypatch)):
        plain = models.build(source, num_classes=classes, kwargs=kwargs)
        series = convert(plain, spec, init="random", inplace=False, progress=False)
        config = {name: entry["group_sizes"][0] for name, entry in spec.items()}
        set_config(series, config)
        for model, record in ((plain, checkpoint.ModelRecord(source, classes, kwargs)),
                              (series, checkpoint.ModelRecord(source, classes, kwargs, spec, config, {"acc": 0.5}))):
            path = tmp_path / f"{i}-{record.spec is not None}.pt"
            checkpoint.save_model(path, model, record)
            loaded, read = models.load(path)
            assert read == record and type(loaded) is type(model)
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_model_files_of_the_previous_format_still_load(tmp_path):
    model = models.build("four_layer")
    path = tmp_path / "old.pt"
    checkpoint.save_weights(path, model, {"model": "four_layer", "num_classes": 10, "spec": None,
                                          "metrics": {"val_acc": 0.1}})  # no `kwargs`, no `config`
    loaded, record = models.load(path)
    assert record.kwargs == {} and record.metrics == {"val_acc": 0.1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    checkpoint.save_weights(tmp_path / "bare.pt", model)
    with pytest.raises(checkpoint.CheckpointError, match="not a gross model file"):
        models.load(tmp_path / "bare.pt")
