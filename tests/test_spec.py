"""gross.spec: `spec: auto` on torchvision and user models, the editable YAML listing, `gross spec`."""
import os

import pytest
import torch.nn as nn
import yaml

from gross import cli, models, spec
from gross.settings import AutoSpecSettings
from pipeline_helpers import tiny_image_folder

SIZE = (3, 224, 224)


def _convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _check_entries(model, found, settings=AutoSpecSettings()):
    convs = _convs(model)
    for name, entry in found.items():
        conv = convs[name]
        assert conv.groups == 1 and max(conv.kernel_size) > 1, name
        width = min(round(settings.bottleneck * conv.in_channels), conv.out_channels)
        assert entry["bottleneck"] == width, name
        assert entry["group_sizes"] == [g for g in (1, 2, 4, 8, 16, 32) if width % g == 0 and g <= settings.max_group_size]


def test_auto_on_resnet18_takes_the_sixteen_block_convs():
    model = models.build("torchvision:resnet18")
    found, left = spec.auto_spec(model, SIZE, AutoSpecSettings())
    assert sorted(found) == sorted(models.default_spec("resnet18"))  # the paper's sixteen 3×3 block convs
    assert found["layer1.0.conv1"] == {"group_sizes": [1, 2, 4, 8, 16, 32], "bottleneck": 64}
    assert left["conv1"].startswith("3→64 channels: fewer than decompose.auto.min_channels=16")
    assert left["1×1"] == "3 1×1 convolutions (nothing to decompose)"  # the downsample shortcuts
    _check_entries(model, found)


def test_auto_on_resnet50_takes_each_bottleneck_3x3():
    model = models.build("torchvision:resnet50")
    found, left = spec.auto_spec(model, SIZE, AutoSpecSettings())
    assert sorted(found) == sorted(n for n in _convs(model) if n.endswith("conv2"))
    assert len(found) == 16 and found["layer4.2.conv2"]["bottleneck"] == 512
    assert left["1×1"] == "36 1×1 convolutions (nothing to decompose)"
    _check_entries(model, found)


def test_auto_on_mobilenet_v2_leaves_every_depthwise_conv_alone_and_lists_it():
    model = models.build("torchvision:mobilenet_v2")
    found, left = spec.auto_spec(model, SIZE, AutoSpecSettings())
    depthwise = [n for n, m in _convs(model).items() if m.groups > 1]
    assert len(depthwise) == 17 and found == {}
    assert all(left[n].startswith(f"depthwise (groups={_convs(model)[n].groups})") for n in depthwise)
    assert "fewer than decompose.auto.min_channels" in left["features.0.0"]  # the 3-channel stem
    with pytest.raises(ValueError, match="auto finds no convolution to decompose in 'torchvision:mobilenet_v2'"):
        spec.resolve("auto", "torchvision:mobilenet_v2", model, SIZE, AutoSpecSettings())


def test_auto_on_a_user_factory_and_its_settings():
    model = models.build("python:user_nets:small_net", num_classes=3, kwargs={"width": 16})
    found, left = spec.auto_spec(model, (3, 32, 32), AutoSpecSettings())
    assert found == {"2": {"group_sizes": [1, 2, 4, 8, 16], "bottleneck": 16},
                     "9": {"group_sizes": [1, 2, 4, 8, 16, 32], "bottleneck": 32}}
    assert left["5"] == "depthwise (groups=32): already grouped" and "0" in left
    assert left["1×1"].startswith("1 1×1")
    narrow = AutoSpecSettings(bottleneck=0.5, max_group_size=8, exclude=("2",))
    assert spec.auto_spec(model, (3, 32, 32), narrow)[0] == {"9": {"group_sizes": [1, 2, 4, 8], "bottleneck": 16}}
    chain = AutoSpecSettings(group_sizes=(1, 4, 16, 32), include=("9",))
    assert spec.auto_spec(model, (3, 32, 32), chain)[0] == {"9": {"group_sizes": [1, 4, 16, 32], "bottleneck": 32}}
    odd = AutoSpecSettings(bottleneck=0.75, include=("2",))  # 12: only 1, 2, 4 divide it
    assert spec.auto_spec(model, (3, 32, 32), odd)[0] == {"2": {"group_sizes": [1, 2, 4], "bottleneck": 12}}


def test_listing_is_yaml_that_passes_back_as_the_same_spec(tmp_path):
    model = models.build("torchvision:resnet18")
    found, left = spec.auto_spec(model, SIZE, AutoSpecSettings())
    text = spec.listing(model, found, left, SIZE, header=["a header line"])
    assert yaml.safe_load(text) == found
    assert text.startswith("# a header line\n# 16 layers decomposed; their convolutions hold 1,676,279,808 of the "
                           "model's 1,814,073,344 MACs (92.4 %)\n")
    assert "layer1.0.conv1:  # 3×3, 64→64, out 56×56: 115,605,504 MACs (6.37 %)" in text
    assert "#   conv1: 3→64 channels" in text
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert spec.resolve(str(path), "torchvision:resnet18", model, SIZE, AutoSpecSettings()) == (found, {})


def test_paper_names_in_a_mapping_and_the_paper_specs():
    vgg = models.build("vgg16_cifar")
    found, _ = spec.resolve({"conv2_1": {"group_sizes": [1, 4]}}, "vgg16_cifar", vgg, (3, 32, 32), AutoSpecSettings())
    assert found == {"features.5": {"group_sizes": [1, 4]}}
    assert spec.resolve("default", "four_layer", models.build("four_layer"), (3, 32, 32),
                        AutoSpecSettings())[0] == models.default_spec("four_layer")
    with pytest.raises(ValueError, match="'default' is the paper's spec of .*use auto"):
        spec.resolve("default", "torchvision:resnet18", models.build("torchvision:resnet18"), SIZE,
                     AutoSpecSettings())


def test_gross_spec_prints_the_spec_and_writes_nothing(tmp_path, capsys):
    folder = tiny_image_folder(tmp_path / "images", train=3, val=1)
    out = tmp_path / "out"
    code = cli.main(["spec", "--config", "imagefolder", "--data-root", str(folder), "--out", str(out),
                     "--set", "data.input_size=[3, 64, 64]"])
    text = capsys.readouterr().out
    assert code == 0 and not os.path.exists(out)
    assert text.startswith("# gross spec: torchvision:resnet18 at input 3×64×64, 3 classes (config imagefolder)\n")
    assert len(yaml.safe_load(text)) == 16 and "out 16×16: 9,437,184 MACs" in text
