"""gross.train: recipes, the fit loop, exact resume after a crash, search-space training, fine-tuning."""
import json

import pytest
import torch
import torch.nn as nn

from gross import checkpoint, config, data, models, train
from gross.checkpoint import CheckpointError
from pipeline_helpers import one_thread, series_four_layer, small_embedded  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(RuntimeError):
    pass


def _loaders(batch_size=32, augment=False, n_train=128, n_val=64):
    return data.make_loaders(*small_embedded(n_train, n_val, augment), batch_size=batch_size, seed=5)


def test_recipes_follow_the_paper():
    assert train.RECIPES["four_layer/scratch"] == train.Recipe(epochs=100, lr=0.1, milestones=(50, 75), runs=5)
    search = train.RECIPES["resnet18/search"]
    assert (search.epochs, search.lr, search.milestones, search.freeze_bn, search.sample, search.series_only) == (
        8, 5e-5, (4, 6), True, True, True)
    assert train.RECIPES["vgg16_imagenet/finetune_high_compression"].milestones == (8, 12)
    assert train.get_recipe("four_layer/search", epochs=2).epochs == 2
    with pytest.raises(ValueError, match="recipe must be one of"):
        train.get_recipe("four_layer/pretrain")


@pytest.mark.parametrize("bad,message", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                                         ({"milestones": (5, 3)}, "milestones"), ({"batch_size": 0}, "batch_size"),
                                         ({"runs": 0}, "runs")])
def test_bad_recipes(bad, message):
    with pytest.raises(ValueError, match=message):
        train.Recipe(**{"epochs": 2, "lr": 0.1, **bad})


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resume_after_crash_reproduces_uninterrupted_run(tmp_path):
    # Search-space recipe on augmented data: resume must restore the weights, optimizer momentum,
    # scheduler, the configuration sampler and the augmentation / shuffling RNG streams.
    recipe = train.Recipe(epochs=3, lr=0.05, milestones=(2,), sample=True, series_only=True, weight_decay=1e-4)
    loaders = _loaders(augment=True)
    full = train.fit(series_four_layer(), loaders[0], loaders[1], recipe, tmp_path / "full", progress=False, device="cpu", seed=2)

    def crash(epoch, step):
        if (epoch, step) == (1, 2):
            raise Crash()

    with pytest.raises(Crash):
        train.fit(series_four_layer(), loaders[0], loaders[1], recipe, tmp_path / "cut", progress=False, device="cpu", seed=2,
                  callback=crash)
    assert checkpoint.load(tmp_path / "cut" / train.CHECKPOINT_NAME)["epoch"] == 1
    torch.manual_seed(123)  # the resumed process starts from unrelated RNG states and weights
    resumed = train.fit(series_four_layer(seed=9), loaders[0], loaders[1], recipe, tmp_path / "cut",
                        progress=False, device="cpu", seed=2, resume=True)
    assert _states_equal(full.model.state_dict(), resumed.model.state_dict())
    assert _without_time(full.history) == _without_time(resumed.history)
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())) == 3
    assert (tmp_path / "cut" / "metrics.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")


def test_mismatched_checkpoint_is_refused_and_kept(tmp_path):
    recipe = train.Recipe(epochs=1, lr=0.05)
    loaders = _loaders(n_train=64)
    train.fit(models.build("four_layer"), loaders[0], loaders[1], recipe, tmp_path, progress=False, device="cpu")
    path = tmp_path / train.CHECKPOINT_NAME
    good = path.read_bytes()
    with pytest.raises(CheckpointError, match="recipe"):
        train.fit(models.build("four_layer"), loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.01), tmp_path,
                  resume=True, progress=False, device="cpu")
    with pytest.raises(CheckpointError, match="model"):
        train.fit(series_four_layer(), loaders[0], loaders[1], recipe, tmp_path, resume=True, progress=False, device="cpu")
    path.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="corrupt"):
        train.fit(models.build("four_layer"), loaders[0], loaders[1], recipe, tmp_path, resume=True, progress=False, device="cpu")
    assert path.read_bytes() == good[:-100]  # refused, not overwritten


def test_search_space_training_trains_only_series_factors():
    model = series_four_layer()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.split(".")[1:2] or
              n.split(".")[1] not in ("firsts", "cores", "lasts")}
    assert "conv2.bias" in frozen and "fc1.weight" in frozen and "conv1.weight" in frozen
    factors = {n: p.clone() for n, p in model.named_parameters() if n not in frozen}
    seen = []
    loaders = _loaders(n_train=96)
    recipe = train.Recipe(epochs=1, lr=0.05, sample=True, series_only=True)
    result = train.train_search_space(model, loaders[0], loaders[1], recipe, progress=False, device="cpu",
                                      callback=lambda e, s: seen.append(config.get_config(model)))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    # term 0 is always active, so its factors must move
    assert not torch.equal(after["conv3.cores.0"], factors["conv3.cores.0"])
    assert len({tuple(c.values()) for c in seen}) == len(seen) == 3  # a fresh configuration per step
    assert set(result.history[0]) >= {"val_acc_largest", "val_acc_smallest"}
    assert all(p.requires_grad for p in model.parameters())  # flags restored after fit
    with pytest.raises(ValueError, match="sample=True"):
        train.train_search_space(model, loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.1))
    with pytest.raises(ValueError, match="no SeriesConv2d"):
        train.fit(models.build("four_layer"), loaders[0], loaders[1], recipe, progress=False, device="cpu")


def test_search_space_training_keeps_zero_gradients_on_inactive_terms():
    """The ops give a term above the sampled group size no gradient; the search-space loop keeps a
    zero one there, so SGD's momentum moves it as in the released training."""
    model = series_four_layer()
    layers = config.series_layers(model).values()
    inactive = []

    def after_step(epoch, step):
        for layer in layers:
            for g, core in zip(layer.group_sizes, layer.cores):
                if g > layer.group_size:
                    inactive.append(core.grad is not None and not core.grad.any())

    loaders = _loaders(n_train=96)
    recipe = train.Recipe(epochs=1, lr=0.05, sample=True, series_only=True)
    train.train_search_space(model, loaders[0], loaders[1], recipe, progress=False, device="cpu",
                             callback=after_step)
    assert inactive and all(inactive)


def test_frozen_batch_norm_keeps_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    loaders = _loaders(n_train=64)
    stats = model[1].running_mean.clone()
    train.fit(model, loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.01, freeze_bn=True), progress=False, device="cpu")
    assert torch.equal(model[1].running_mean, stats)
    train.fit(model, loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.01), progress=False, device="cpu")
    assert not torch.equal(model[1].running_mean, stats)


def test_finetune_fixed_configuration():
    model = series_four_layer()
    loaders = _loaders(n_train=64)
    chosen = {"conv2": 4, "conv3": 8, "conv4": 2}
    seen = []
    train.finetune(model, chosen, loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.05), progress=False, device="cpu",
                   callback=lambda e, s: seen.append(config.get_config(model)))
    assert seen == [chosen, chosen]
    with pytest.raises(ValueError, match="missing"):
        train.finetune(model, {"conv2": 4}, loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.05))
    with pytest.raises(ValueError, match="sample=False"):
        train.finetune(model, chosen, loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.05, sample=True))


def test_from_scratch_keeps_median_run(tmp_path):
    loaders = _loaders(n_train=96)
    recipe = train.Recipe(epochs=1, lr=0.05, runs=3)
    model, runs = train.train_from_scratch("four_layer", loaders, recipe, tmp_path, progress=False, device="cpu")
    accs = sorted(r["val_acc"] for r in runs)
    chosen = json.loads((tmp_path / "runs.json").read_text())["median_run"]
    assert runs[chosen]["val_acc"] == accs[1]
    assert train.accuracy(model, loaders[1]) == accs[1]
    assert train.accuracy(model, loaders[2]) == runs[chosen]["test_acc"]
    assert [r["seed"] for r in runs] == [0, 1, 2]


def test_fit_learns_and_rejects_bad_arguments(tmp_path):
    loaders = _loaders(n_train=640, batch_size=32)
    result = train.fit(models.build("four_layer"), loaders[0], loaders[1],
                       train.Recipe(epochs=5, lr=0.05, milestones=(4,)), progress=False, device="cpu")
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0] and result.history[-1]["val_acc"] > 0.5
    assert [row["lr"] for row in result.history] == pytest.approx([0.05] * 4 + [0.005])
    with pytest.raises(TypeError, match="Recipe"):
        train.fit(models.build("four_layer"), loaders[0], loaders[1], {"epochs": 1})
    with pytest.raises(ValueError, match="out_dir"):
        train.fit(models.build("four_layer"), loaders[0], loaders[1], train.Recipe(epochs=1, lr=0.1), resume=True)
    plain = torch.utils.data.DataLoader(loaders[0].dataset, batch_size=8)
    with pytest.raises(ValueError, match="set_epoch"):
        train.fit(models.build("four_layer"), plain, loaders[1], train.Recipe(epochs=1, lr=0.1))


def test_end_to_end_train_convert_search_space(tmp_path):
    decompose = pytest.importorskip("gross.decompose", reason="gross.decompose has not landed")
    loaders = _loaders(n_train=128)
    model, _ = train.train_from_scratch("four_layer", loaders, train.Recipe(epochs=2, lr=0.05), progress=False, device="cpu")
    converted = decompose.convert(model, models.default_spec("four_layer"), init="random")
    assert list(config.series_layers(converted)) == ["conv2", "conv3", "conv4"]
    recipe = train.get_recipe("four_layer/search", epochs=1, lr=1e-3, milestones=())
    result = train.train_search_space(converted, loaders[0], loaders[1], recipe, out_dir=tmp_path, progress=False, device="cpu")
    assert 0.0 <= result.history[0]["val_acc_smallest"] <= 1.0
    assert (tmp_path / train.CHECKPOINT_NAME).exists()


class _Poisoned(nn.Module):
    """Wraps a model; once `poisoned` is set its outputs are NaN (a diverged network, on cue)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.poisoned = model, False

    def forward(self, x):
        out = self.model(x)
        return out * float("nan") if self.poisoned else out


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    loaders = _loaders(n_train=96, batch_size=32)  # 3 steps per epoch
    model = _Poisoned(models.build("four_layer"))
    seen = []

    def poison(epoch, step):
        seen.append((epoch, step))
        model.poisoned = (epoch, step) == (1, 0)  # the loss of epoch 2, step 2 is NaN

    with pytest.raises(train.NonFiniteError, match=r"^finetune 4-4: the loss is nan at epoch 2, step 2 "
                                                      r"\(lr 0\.05\): training stopped; the last good checkpoint "
                                                 r".*checkpoint\.pt' is kept; lower the learning rate"):
        train.fit(model, loaders[0], loaders[1], train.Recipe(epochs=3, lr=0.05), tmp_path, device="cpu",
                  progress=False, callback=poison, name="finetune 4-4")
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0)]  # no step ran after the NaN loss
    state = checkpoint.load(tmp_path / train.CHECKPOINT_NAME)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 1
