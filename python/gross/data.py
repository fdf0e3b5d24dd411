"""Datasets (CIFAR-10 python batches, ImageNet folders, embedded 8×8 digits) and (distributed) data loaders."""
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_SPLIT = (1197, 300, 300)  # train / val / test sizes of the 1797 digits
_EMBEDDED_SEED = 20200823  # fixed shuffle before splitting, so the split never changes


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


def _normalize(mean, std):
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def cifar_transforms(augment):
    """The paper's CIFAR pipeline: (flip + pad 4 + crop 32 if augment) then normalise."""
    aug = [v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4)] if augment else []
    return v2.Compose(aug + _normalize(CIFAR_MEAN, CIFAR_STD))


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = list(batch[b"labels"])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path!r} is not a CIFAR-10 python batch (a pickled dict with b'data' "
                         f"(N×3072 uint8) and b'labels'): {err}") from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise ValueError(f"{path!r}: b'data' must be N×3072 with N labels, got {data.shape} and {len(labels)} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _cifar_dir(root):
    root = os.fspath(root)
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, "data_batch_1")):
            return candidate
    raise FileNotFoundError(
        f"CIFAR-10 not found in {root!r}: expected the python-version files data_batch_1 … data_batch_5 and "
        f"test_batch in it or in {os.path.join(root, 'cifar-10-batches-py')!r}")


def load_cifar10(root, augment=True):
    """CIFAR-10 from python batches: (train = batches 1–4 [augmented], val = batch 5, test = test_batch)."""
    directory = _cifar_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {directory!r} lacks {missing}")
    batches = [_read_cifar_batch(os.path.join(directory, n)) for n in names]
    train_images = torch.cat([b[0] for b in batches[:4]])
    train_labels = [label for b in batches[:4] for label in b[1]]
    return (ImageTensorDataset(train_images, train_labels, cifar_transforms(augment)),
            ImageTensorDataset(*batches[4], cifar_transforms(False)),
            ImageTensorDataset(*batches[5], cifar_transforms(False)))


def load_imagenet(root):
    """ImageNet from an ImageFolder tree root/train, root/val: (train [augmented], val, val).

    ImageNet's test labels are not public, so the validation set serves both for search and report.
    """
    from torchvision.datasets import ImageFolder
    root = os.fspath(root)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"ImageNet not found: expected class sub-folders under "
                                    f"{os.path.join(root, split)!r} (ImageFolder layout root/train, root/val)")
    train_tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                           *_normalize(IMAGENET_MEAN, IMAGENET_STD)])
    eval_tf = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                          *_normalize(IMAGENET_MEAN, IMAGENET_STD)])
    val = ImageFolder(os.path.join(root, "val"), eval_tf)
    return ImageFolder(os.path.join(root, "train"), train_tf), val, val


def load_embedded(augment=False):
    """scikit-learn's 8×8 digits upscaled to 32×32×3 (no download): fixed (train, val, test) of 1197/300/300.

    augment=True adds pad 4 + random crop 32 on train (no flips: digits are not mirror-symmetric).
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(_EMBEDDED_SEED))
    images, labels = images[order], labels[order]
    n_train, n_val, _ = EMBEDDED_SPLIT
    mean = images[:n_train].float().mean().item() / 255
    std = images[:n_train].float().std().item() / 255
    plain = v2.Compose(_normalize((mean,) * 3, (std,) * 3))
    train_tf = v2.Compose([v2.RandomCrop(32, padding=4), plain]) if augment else plain
    cuts = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    return tuple(ImageTensorDataset(images[c], labels[c], tf) for c, tf in zip(cuts, (train_tf, plain, plain)))


def load(name, root=None, augment=True):
    """Datasets by name: 'embedded' (no root), 'cifar10' or 'imagenet' (root required) → (train, val, test).

    `augment` switches CIFAR-10's train augmentation; the embedded digits are used unaugmented
    (their 8×8 originals are too coarse for crops to help) and ImageNet always augments.
    """
    if name == "embedded":
        return load_embedded(augment=False)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder")
    if name == "cifar10":
        return load_cifar10(root, augment)
    if name == "imagenet":
        return load_imagenet(root)
    raise ValueError(f"dataset name must be 'embedded', 'cifar10' or 'imagenet', got {name!r}")


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
