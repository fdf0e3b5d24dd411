"""gross.data: CIFAR-10 python batches, ImageNet folders, the embedded digits, loaders and shards."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gross import data


def _write_cifar(folder, per_batch=6, seed=0):
    """A tiny CIFAR-10 folder in the real format (pickled dicts, N×3072 uint8 rows in CHW order)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    return batches


def test_cifar10_split_and_values(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    train, val, test = data.load_cifar10(tmp_path)  # finds the standard sub-folder
    assert (len(train), len(val), len(test)) == (24, 6, 6)
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 5)), [])
    assert val.labels.tolist() == batches["data_batch_5"][b"labels"]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    x, y = test[2]
    raw = batches["test_batch"][b"data"][2].reshape(3, 32, 32)
    # channel 1, pixel (5, 7): scaled to [0, 1] then normalised with the CIFAR statistics
    expected = (raw[1, 5, 7] / 255 - data.CIFAR_MEAN[1]) / data.CIFAR_STD[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[1, 5, 7].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(val[0][0], val[0][0])  # evaluation splits are not augmented


def test_cifar10_train_augmentation_is_random_flip_and_crop(tmp_path):
    _write_cifar(tmp_path)
    train, _, _ = data.load_cifar10(tmp_path)
    plain, _, _ = data.load_cifar10(tmp_path, augment=False)
    reference = plain[0][0]
    views = [train[0][0] for _ in range(20)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(v, reference) for v in views)
    # every view is the image shifted by at most 4 pixels (zero padded) and maybe mirrored
    for v in views:
        found = False
        for img in (reference, reference.flip(-1)):
            padded = torch.nn.functional.pad(img, (4, 4, 4, 4), value=float("nan"))
            for dy in range(9):
                for dx in range(9):
                    window = padded[:, dy:dy + 32, dx:dx + 32]
                    inside = ~window.isnan()
                    found |= bool(torch.allclose(v[inside], window[inside]))
        assert found


def test_cifar10_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1 … data_batch_5 and test_batch"):
        data.load_cifar10(tmp_path / "nowhere")
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['test_batch'\]"):
        data.load_cifar10(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"labels": [1]}, f)
    with pytest.raises(ValueError, match="test_batch.*not a CIFAR-10 python batch"):
        data.load_cifar10(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load_cifar10(tmp_path / "c")


def test_embedded_digits_split():
    train, val, test = data.load_embedded()
    assert (len(train), len(val), len(test)) == data.EMBEDDED_SPLIT
    for split in (train, val, test):
        assert set(split.labels.tolist()) == set(range(10))
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and x.std() > 0.1
    again = data.load_embedded()
    assert torch.equal(again[2].images, test.images) and torch.equal(again[0].labels, train.labels)
    # the three splits share no image
    keys = [{bytes(img.numpy()) for img in s.images} for s in (train, val, test)]
    assert not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_imagenet_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder layout root/train, root/val"):
        data.load_imagenet(tmp_path)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / split / cls / "a.png")
    train, val, test = data.load_imagenet(tmp_path)
    assert len(train) == len(val) == 2 and test is val
    assert train[0][0].shape == val[1][0].shape == (3, 224, 224) and val[1][1] == 1


def test_named_loader():
    with pytest.raises(ValueError, match="needs a root"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="'embedded', 'cifar10' or 'imagenet'"):
        data.load("mnist", root="/tmp")


def test_loaders_order_depends_on_seed_and_epoch_only():
    train, val, test = data.load_embedded()
    loaders = data.make_loaders(train, val, test, batch_size=50, seed=3)

    def labels(epoch):
        loaders[0].sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loaders[0]])

    assert torch.equal(labels(1), labels(1)) and not torch.equal(labels(1), labels(2))
    assert len(labels(0)) == len(train)
    x, y = next(iter(loaders[1]))
    assert x.shape == (50, 3, 32, 32) and torch.equal(y, val.labels[:50])
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loaders(train, val, test, batch_size=0)


def test_shard_sampler_splits_exactly():
    shards = [list(data.ShardSampler(7, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == list(range(7))


# --------------------------------------------------------------------------------------------
# Any dataset: image folders, CIFAR-100, settings; the search split never the report split

from gross.settings import DataSettings  # noqa: E402
from pipeline_helpers import tiny_image_folder  # noqa: E402


def _paths(dataset):
    """The image files a (Subset of an) ImageFolder yields, in order."""
    if isinstance(dataset, torch.utils.data.Subset):
        return [_paths(dataset.dataset)[i] for i in dataset.indices]
    return [path for path, _ in dataset.samples]


def test_image_folder_splits_are_disjoint_seeded_and_stratified(tmp_path):
    root = tiny_image_folder(tmp_path, classes=3, train=8, val=4)
    s = data.splits(DataSettings(name="imagefolder", root=str(root), search_per_class=2, input_size=(3, 40, 48)))
    train, search, report = (_paths(d) for d in (s.train, s.search, s.report))
    assert s.num_classes == 3 and (len(train), len(search), len(report)) == (18, 6, 12)
    assert all("/train/" in p for p in train + search) and all("/val/" in p for p in report)
    assert not set(search) & set(report) and not set(search) & set(train)  # never overlapping
    assert sorted(train + search) == sorted(_paths(data.load_imagefolder(root)[0]))
    assert sorted(torch.tensor([y for _, y in s.search]).tolist()) == [0, 0, 1, 1, 2, 2]
    again = data.splits(DataSettings(name="imagefolder", root=str(root), search_per_class=2))
    other = data.splits(DataSettings(name="imagefolder", root=str(root), search_per_class=2, split_seed=1))
    assert _paths(again.search) == search and _paths(other.search) != search
    # the held-out images are evaluated: no augmentation; training images are augmented
    x, _ = s.search[0]
    assert x.shape == (3, 40, 48) and torch.equal(x, s.search[0][0])
    assert s.train[0][0].shape == (3, 40, 48) and not torch.equal(s.train[0][0], s.train[0][0])
    # default size: a tenth of the smallest class, at least one
    assert len(data.splits(DataSettings(name="imagefolder", root=str(root))).search) == 3


def test_image_folder_normalisation_and_channels_are_settings(tmp_path):
    root = tiny_image_folder(tmp_path, classes=2, train=2, val=1)
    plain = data.splits(DataSettings(name="imagefolder", root=str(root), input_size=(3, 8, 8), mean=(0, 0, 0),
                                     std=(1, 1, 1)))
    x, _ = plain.report[0]
    assert 0 <= x.min() and x.max() <= 1  # scaled to [0, 1] only
    gray = data.splits(DataSettings(name="imagefolder", root=str(root), input_size=(1, 8, 8), mean=(0.5,),
                                    std=(0.25,)))
    assert gray.report[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="one value per channel"):
        data.splits(DataSettings(name="imagefolder", root=str(root), input_size=(1, 8, 8)))


def test_cifar10_keeps_the_papers_split(tmp_path):
    batches = _write_cifar(tmp_path)
    s = data.splits(DataSettings(name="cifar10", root=str(tmp_path)))
    assert s.search.labels.tolist() == batches["data_batch_5"][b"labels"]
    assert s.report.labels.tolist() == batches["test_batch"][b"labels"]
    with pytest.raises(ValueError, match="search_per_class must be null for cifar10: it searches on its own "
                                         "validation split \\(data batch 5\\)"):
        data.splits(DataSettings(name="cifar10", root=str(tmp_path), search_per_class=1))


def test_cifar100_holds_out_a_search_split(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    labels = {"train": [c for c in range(100) for _ in range(3)], "test": list(range(100))}
    for name, ys in labels.items():
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (len(ys), 3072), dtype=np.uint8), b"fine_labels": ys,
                         b"coarse_labels": [y // 5 for y in ys]}, f)
    s = data.splits(DataSettings(name="cifar100", root=str(tmp_path), search_per_class=1))
    assert s.num_classes == 100 and (len(s.train), len(s.search), len(s.report)) == (200, 100, 100)
    assert not set(s.train.indices) & set(s.search.indices)
    assert sorted(s.search.dataset.labels[s.search.indices].tolist()) == list(range(100))
    assert s.search[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="search_per_class=3: class 0 has only 3 training images"):
        data.splits(DataSettings(name="cifar100", root=str(tmp_path), search_per_class=3))


def test_embedded_search_and_report_splits_never_overlap():
    s = data.splits(DataSettings(name="embedded"))
    keys = [{bytes(img.numpy()) for img in d.images} for d in (s.train, s.search, s.report)]
    assert not keys[1] & keys[2] and not keys[0] & keys[1] and s.num_classes == 10


@pytest.mark.parametrize("layout, error, message", [
    ({"train": ["a"], "val": ["a"]}, ValueError, r"at least two classes under train/, found 1 \(\['a'\]\)"),
    ({"train": ["a", "b"]}, FileNotFoundError, "has no split folder 'val'"),
    ({"val": ["a", "b"]}, FileNotFoundError, "has no split folder 'train'"),
    ({"train": ["a", "b"], "val": ["a", "c"]}, ValueError, r"only in train/: \['b'\], only in val/: \['c'\]"),
])
def test_bad_image_folders(tmp_path, layout, error, message):
    for split, classes in layout.items():
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / c / "x.png")
    with pytest.raises(error, match=message):
        data.num_classes("imagefolder", str(tmp_path))
