"""Export: a configuration as plain PyTorch (same outputs), torch.save round trip, torch.export, ONNX."""
import itertools

import pytest
import torch
import torch.nn as nn

from gross import export
from gross.config import config_space, series_layers, set_config
from gross_kernels import SeriesConv2d


def small_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        SeriesConv2d(8, 8, 3, [1, 2, 4, 8], padding=1), nn.ReLU(),
        nn.Sequential(SeriesConv2d(8, 12, 3, [2, 4], bottleneck=(4, 6), stride=2, padding=2, dilation=2)),
        nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def all_configs(model):
    space = config_space(model)
    return [dict(zip(space, sizes)) for sizes in itertools.product(*space.values())]


def test_every_configuration_exports_to_the_same_function():
    model = small_model()
    x = torch.randn(3, 3, 8, 8)
    configs = all_configs(model)
    assert len(configs) == 8
    for config in configs:
        plain = export.to_plain(model, config)
        assert not series_layers(plain)
        assert all(type(m) in (nn.Sequential, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear) for m in plain.modules())
        set_config(model, config)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)
    # The source model keeps its own configuration and its series layers.
    assert len(series_layers(model)) == 2


def test_save_and_load_round_trip(tmp_path):
    model = small_model()
    plain = export.to_plain(model, {"2": 2, "4.0": 4})
    path = export.save(plain, str(tmp_path / "sub" / "model.pt"))
    loaded = export.load(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.pt"]


def test_torch_export_program_matches():
    plain = export.to_plain(small_model(), {"2": 1, "4.0": 2})
    x = torch.randn(2, 3, 8, 8)
    program = export.export_program(plain, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), plain(x))
        torch.testing.assert_close(program.module()(x[:1]), plain(x[:1]))


def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    plain = export.to_plain(small_model(), {"2": 4, "4.0": 4})
    path = export.export_onnx(plain, torch.randn(1, 3, 8, 8), str(tmp_path / "m.onnx"))
    onnx.checker.check_model(onnx.load(path))


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="not a group size"):
        export.to_plain(small_model(), {"2": 3})
