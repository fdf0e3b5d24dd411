"""gross.config: listing, getting, setting (validated, all-or-nothing) and sampling configurations."""
import pytest
import torch

from gross import config
from pipeline_helpers import series_four_layer


def test_series_layers_and_space():
    model = series_four_layer()
    assert list(config.series_layers(model)) == ["conv2", "conv3", "conv4"]
    assert config.config_space(model) == {"conv2": [1, 2, 4, 8, 16, 32], "conv3": [1, 2, 4, 8, 16, 32],
                                          "conv4": [1, 2, 4, 8, 16, 32, 64]}
    assert config.get_config(model) == {"conv2": 32, "conv3": 32, "conv4": 64}  # largest by default
    assert config.extreme_config(model, largest=False) == {"conv2": 1, "conv3": 1, "conv4": 1}


def test_set_config_changes_function():
    model = series_four_layer()
    torch.manual_seed(3)
    for layer in config.series_layers(model).values():  # non-zero higher terms so sizes differ
        for p in layer.cores:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    full = model(x)
    config.set_config(model, {"conv2": 4, "conv4": 16})
    assert config.get_config(model) == {"conv2": 4, "conv3": 32, "conv4": 16}
    assert not torch.allclose(model(x), full)
    config.set_config(model, {"conv2": 32, "conv3": 32, "conv4": 64}, complete=True)
    assert torch.allclose(model(x), full)


def test_bad_configs_raise_and_change_nothing():
    model = series_four_layer()
    before = config.get_config(model)
    with pytest.raises(ValueError, match=r"unknown layers \['conv9'\].*conv2"):
        config.set_config(model, {"conv2": 4, "conv9": 4})
    with pytest.raises(ValueError, match=r"config\['conv3'\] = 3 .*valid sizes are \[1, 2, 4, 8, 16, 32\]"):
        config.set_config(model, {"conv2": 4, "conv3": 3})
    with pytest.raises(ValueError, match="conv4"):
        config.set_config(model, {"conv4": 128})
    with pytest.raises(TypeError, match="int group size"):
        config.set_config(model, {"conv2": 4.0})
    with pytest.raises(TypeError, match="mapping"):
        config.set_config(model, [("conv2", 4)])
    with pytest.raises(ValueError, match=r"missing \['conv3', 'conv4'\]"):
        config.set_config(model, {"conv2": 4}, complete=True)
    assert config.get_config(model) == before
    with pytest.raises(ValueError, match=r"group_size 64 is not available in layers \['conv2', 'conv3'\]"):
        config.uniform_config(model, 64)
    assert config.uniform_config(model, 8) == {"conv2": 8, "conv3": 8, "conv4": 8}


def test_sample_config_is_seeded_uniform_and_applied():
    model = series_four_layer()
    draws = [config.sample_config(model, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1] == config.get_config(model)
    gen = torch.Generator().manual_seed(0)
    seen = {size for _ in range(200) for size in [config.sample_config(model, gen)["conv4"]]}
    assert seen == {1, 2, 4, 8, 16, 32, 64}


def test_experiment_settings_have_one_typed_section_each(tmp_path):
    from gross import settings

    cfg = settings.load_config("demo", ["decompose.tol=1e-3", "search.beam=2", "decompose.auto.include=[conv*]",
                                        "model_kwargs.width=3"])
    assert cfg["decompose"]["tol"] == 0.001  # YAML 1.1 would read 1e-3 as text
    s = settings.from_dict(cfg)
    assert isinstance(s.data, settings.DataSettings) and isinstance(s.decompose.auto, settings.AutoSpecSettings)
    assert s.search.beam == 2 and s.decompose.auto.include == ("conv*",) and s.model_kwargs == {"width": 3}
    assert s.reproduce.runs >= 3 and s.decompose.auto.max_group_size == 32  # defaults, written once
    assert settings.from_dict(s.to_dict()) == s  # experiment.json reads back as the same settings
    path = tmp_path / "minimal.yaml"
    path.write_text("model: four_layer\nout: x\ntrain: {epochs: 1, lr: 0.1}\nsearch_space: {epochs: 1, lr: 1e-4, "
                    "sample: true, series_only: true}\nfinetune: {epochs: 1, lr: 1.0e-3}\n")
    minimal = settings.from_dict(settings.load_config(str(path)))
    assert minimal.search == settings.SearchSettings() and minimal.search_space.lr == 1e-4
    with pytest.raises(ValueError, match=r"unknown keys \['data.nmae', 'search.bream'\]"):
        settings.from_dict(dict(cfg, search={"bream": 1}, data={"nmae": "x"}))
    with pytest.raises(ValueError, match="search.strategy must be one of \\['exhaustive', 'bfs'\\], got 'dfs'"):
        settings.from_dict(dict(cfg, search={"strategy": "dfs"}))
