"""Datasets (embedded digits, CIFAR-10/100, ImageNet, any image folder), the honest search split, and loaders.

Readers return `(train, val, test)` as the files hold them. `splits` turns that into the three
roles of an experiment: `train` fits weights, `search` chooses configurations (and the median
from-scratch run), `report` gives the accuracy the table reports. `search` is never `report`:
where the files have no separate validation split (CIFAR-100, ImageNet, image folders, whose
`val` is what is reported), a seeded per-class part of the training images is held out for it.
CIFAR-10 keeps the paper's split (batches 1–4 train, batch 5 search, test batch report).
"""
import copy
import dataclasses
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2

from gross.settings import DATASETS

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_SPLIT = (1197, 300, 300)  # train / val / test sizes of the 1797 digits
_EMBEDDED_SEED = 20200823  # fixed shuffle before splitting, so the split never changes
_NATIVE_SIDE = {"embedded": 32, "cifar10": 32, "cifar100": 32, "imagenet": 224, "imagefolder": 224}
_FIXED_CLASSES = {"embedded": 10, "cifar10": 10, "cifar100": 100}
_SEARCH_PER_CLASS = {"cifar100": 100, "imagenet": 10}  # image folders: a tenth of the smallest class
_FOLDER_LAYOUT = "ImageFolder layout root/train, root/val"


class ImageTensorDataset(Dataset):
    """Images held as one uint8 tensor (N, 3, H, W) with int labels; `transform` maps a uint8 image to a tensor."""

    def __init__(self, images, labels, transform):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length, got {len(images)} and {len(labels)}")
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.long), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.labels[index]


def _finish(size, channels, mean, std):
    """Resize to `size` (when given), keep `channels` (1: grayscale), scale to [0, 1] and normalise."""
    resize = [] if size is None else [v2.Resize(size, antialias=True)]
    gray = [v2.Grayscale(1)] if channels == 1 else []
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean and data.std must have one value per channel ({channels}), "
                         f"got {list(mean)} and {list(std)}")
    return resize + gray + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def cifar_transforms(augment, input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD):
    """The paper's CIFAR pipeline: (flip + pad 4 + crop 32 if augment), resize to input_size if not 32×32, normalise."""
    aug = [v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4)] if augment else []
    size = None if tuple(input_size[1:]) == (32, 32) else tuple(input_size[1:])
    return v2.Compose(aug + _finish(size, input_size[0], mean, std))


def folder_transforms(augment, input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """ImageNet-style pipeline at `input_size`: random resized crop + flip (train) or resize + centre crop (eval)."""
    size = tuple(input_size[1:])
    if augment:
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        # The usual 0.875 crop ratio: 256 → 224 for ImageNet.
        geometry = [v2.Resize(round(min(size) / 0.875), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *geometry, *_finish(None, input_size[0], mean, std)])


def _read_cifar_batch(path, label_key=b"labels", what="CIFAR-10 python batch"):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = list(batch[label_key])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path!r} is not a {what} (a pickled dict with b'data' "
                         f"(N×3072 uint8) and {label_key!r}): {err}") from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise ValueError(f"{path!r}: b'data' must be N×3072 with N labels, got {data.shape} and {len(labels)} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


_CIFAR_FILES = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
                "cifar100": ("cifar-100-python", ["train", "test"])}


def _cifar_dir(root, name="cifar10"):
    """The folder holding `name`'s python files (root or its standard sub-folder), every file present."""
    root = os.fspath(root)
    sub, files = _CIFAR_FILES[name]
    directory = next((c for c in (root, os.path.join(root, sub)) if os.path.isfile(os.path.join(c, files[0]))), None)
    if directory is None:
        listed = "data_batch_1 … data_batch_5 and test_batch" if name == "cifar10" else "train and test"
        raise FileNotFoundError(f"{name.upper().replace('CIFAR', 'CIFAR-')} not found in {root!r}: expected the "
                                f"python-version files {listed} in it or in {os.path.join(root, sub)!r}")
    missing = [n for n in files if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"{name.upper().replace('CIFAR', 'CIFAR-')} folder {directory!r} lacks {missing}")
    return directory


def load_cifar10(root, augment=True, input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD):
    """CIFAR-10 from python batches: (train = batches 1–4 [augmented], val = batch 5, test = test_batch)."""
    directory = _cifar_dir(root, "cifar10")
    batches = [_read_cifar_batch(os.path.join(directory, n)) for n in _CIFAR_FILES["cifar10"][1]]
    train_images = torch.cat([b[0] for b in batches[:4]])
    train_labels = [label for b in batches[:4] for label in b[1]]
    plain = cifar_transforms(False, input_size, mean, std)
    return (ImageTensorDataset(train_images, train_labels, cifar_transforms(augment, input_size, mean, std)),
            ImageTensorDataset(*batches[4], plain), ImageTensorDataset(*batches[5], plain))


def load_cifar100(root, augment=True, input_size=(3, 32, 32), mean=CIFAR100_MEAN, std=CIFAR100_STD):
    """CIFAR-100 (fine labels) from its python files: (train [augmented], test, test); it has no validation split."""
    directory = _cifar_dir(root, "cifar100")
    train, test = (_read_cifar_batch(os.path.join(directory, n), b"fine_labels", "CIFAR-100 python file")
                   for n in ("train", "test"))
    test = ImageTensorDataset(*test,
                              cifar_transforms(False, input_size, mean, std))
    return ImageTensorDataset(*train, cifar_transforms(augment, input_size, mean, std)), test, test


def folder_classes(root):
    """The class names of an image folder root/train, root/val (checked: both splits, the same classes, two or more)."""
    from torchvision.datasets.folder import find_classes

    root = os.fspath(root)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"data.root {root!r} has no split folder {split!r}: expected class sub-folders "
                                    f"under {os.path.join(root, split)!r} ({_FOLDER_LAYOUT})")
    classes = {split: find_classes(os.path.join(root, split))[0] for split in ("train", "val")}
    if len(classes["train"]) < 2:
        raise ValueError(f"data.root {root!r}: an image folder needs at least two classes under train/, "
                         f"found {len(classes['train'])} ({classes['train']})")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(f"data.root {root!r}: train/ and val/ must hold the same class folders; "
                         f"only in train/: {only_train}, only in val/: {only_val}")
    return classes["train"]


def load_imagefolder(root, augment=True, input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Any image classification folder root/train/CLASS/*, root/val/CLASS/*: (train [augmented], val, val)."""
    from torchvision.datasets import ImageFolder

    folder_classes(root)
    try:
        train = ImageFolder(os.path.join(root, "train"), folder_transforms(augment, input_size, mean, std))
        val = ImageFolder(os.path.join(root, "val"), folder_transforms(False, input_size, mean, std))
    except FileNotFoundError as err:  # a class folder without images
        raise FileNotFoundError(f"data.root {os.fspath(root)!r}: {err}") from err
    return train, val, val


# ImageNet is an image folder (root/train, root/val) read with its own statistics, the defaults;
# its test labels are not public, so `splits` holds a search split out of train and reports on val.
load_imagenet = load_imagefolder


def load_embedded(augment=False, input_size=(3, 32, 32), mean=None, std=None):
    """scikit-learn's 8×8 digits upscaled to input_size (no download): fixed (train, val, test) of 1197/300/300.

    augment=True adds pad 4 + random crop on train (no flips: digits are not mirror-symmetric).
    mean/std default to the training images' own statistics.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    size = tuple(input_size[1:])
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(_EMBEDDED_SEED))
    images, labels = images[order], labels[order]
    n_train, n_val, _ = EMBEDDED_SPLIT
    channels = input_size[0]
    mean = mean or (images[:n_train].float().mean().item() / 255,) * channels
    std = std or (images[:n_train].float().std().item() / 255,) * channels
    plain = v2.Compose(_finish(None, channels, mean, std))
    train_tf = v2.Compose([v2.RandomCrop(size, padding=4), plain]) if augment else plain
    cuts = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    return tuple(ImageTensorDataset(images[c], labels[c], tf) for c, tf in zip(cuts, (train_tf, plain, plain)))


def input_size_of(name, size=None):
    """The (C, H, W) a dataset is fed at: `size` when given, else the dataset's own (32×32 or 224×224 RGB)."""
    return tuple(size) if size is not None else (3, _NATIVE_SIDE[name], _NATIVE_SIDE[name])


def load(name, root=None, augment=True, input_size=None, mean=None, std=None):
    """Datasets by name → (train, val, test) as the files hold them (see the module docstring).

    'embedded' needs no root; 'cifar10', 'cifar100', 'imagenet' and 'imagefolder' read `root`.
    The embedded digits are used unaugmented (their 8×8 originals are too coarse for crops to
    help). `input_size` (C, H, W) and `mean`/`std` default to the dataset's own.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be 'embedded', 'cifar10' or 'imagenet' (the paper's), "
                         f"'cifar100' or 'imagefolder', got {name!r}")
    size = input_size_of(name, input_size)
    stats = {} if mean is None and std is None else {"mean": mean, "std": std}
    if name == "embedded":
        return load_embedded(False, size, **stats)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (data.root)")
    readers = {"cifar10": load_cifar10, "cifar100": load_cifar100, "imagenet": load_imagenet,
               "imagefolder": load_imagefolder}
    return readers[name](root, augment, size, **stats)


def num_classes(name, root=None):
    """The class count of a dataset, from its files where it varies; checks that they are there (cheaply)."""
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"dataset {name!r} needs a root folder (data.root)")
        _cifar_dir(root, name)
    if name in _FIXED_CLASSES:
        return _FIXED_CLASSES[name]
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (data.root)")
    return len(folder_classes(root))


def _labels(dataset):
    return dataset.labels.tolist() if isinstance(dataset, ImageTensorDataset) else list(dataset.targets)


def holdout(labels, per_class, seed):
    """(kept, held) sorted index lists: `per_class` indices of every class, drawn with `seed`, are held out."""
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) <= per_class:
            raise ValueError(f"data.search_per_class={per_class}: class {c} has only {len(members)} training "
                             f"images; at least one must stay for training")
        held += members[torch.randperm(len(members), generator=gen)[:per_class]].tolist()
    held = sorted(held)
    kept = sorted(set(range(len(labels))) - set(held))
    return kept, held


@dataclasses.dataclass
class Splits:
    """The three roles of an experiment's data: `train` fits, `search` chooses, `report` reports (disjoint)."""

    train: Dataset
    search: Dataset
    report: Dataset
    num_classes: int


def splits(settings):
    """The `Splits` of a `gross.settings.DataSettings`; the search split is held out of train where needed."""
    s = settings
    train, val, test = load(s.name, s.root, s.augment, s.input_size, s.mean, s.std)
    if val is not test:  # the files have a validation split: the search uses it (the paper's CIFAR-10)
        if s.search_per_class is not None:
            raise ValueError(f"data.search_per_class must be null for {s.name}: it searches on its own validation "
                             f"split ({'data batch 5' if s.name == 'cifar10' else 'the fixed 300 digits'})")
        search = val
    else:
        labels = _labels(train)
        per_class = s.search_per_class or _SEARCH_PER_CLASS.get(s.name) or max(1, min(np.bincount(labels)) // 10)
        kept, held = holdout(labels, per_class, s.split_seed)
        plain = copy.copy(train)  # the held-out images are evaluated, so without augmentation
        plain.transform = test.transform
        train, search = Subset(train, kept), Subset(plain, held)
    if s.limit is not None:  # smoke runs: the first `limit` samples of each split
        train, search, test = (Subset(ds, range(min(s.limit, len(ds)))) for ds in (train, search, test))
    return Splits(train, search, test, num_classes(s.name, s.root))


class ShardSampler(Sampler):
    """Indices rank, rank + world, … in order: an exact, unpadded split of an evaluation set across processes."""

    def __init__(self, length, rank, world_size):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _dist_info(distributed):
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loaders(train, val, test, batch_size, eval_batch_size=None, workers=0, seed=0, shuffle=True,
                 drop_last=False, distributed=True):
    """(train, val, test) DataLoaders; the train order is a function of (seed, epoch) only.

    The train loader always uses a DistributedSampler (one replica when not distributed), so call
    `loader.sampler.set_epoch(epoch)` each epoch; resuming at an epoch reproduces its order.
    When torch.distributed is initialised (and distributed=True) each process gets its shard
    of every split; batch_size is per process.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    eval_batch_size = eval_batch_size or batch_size
    rank, world = _dist_info(distributed)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    common = {"num_workers": workers, "persistent_workers": False, "pin_memory": torch.cuda.is_available()}
    loaders = [DataLoader(train, batch_size, sampler=sampler, drop_last=drop_last, **common)]
    for dataset in (val, test):
        loaders.append(DataLoader(dataset, eval_batch_size, sampler=ShardSampler(len(dataset), rank, world),
                                  **common))
    return tuple(loaders)
