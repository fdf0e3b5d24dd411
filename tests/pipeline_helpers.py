"""Shared fixtures for the pipeline tests: a converted 4-layer net, small slices of the embedded data, torchrun."""
import functools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Subset

from gross import data, models
from gross_kernels import SeriesConv2d


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads oversubscribe and run ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def series_four_layer(seed=0):
    """The 4-layer net with conv2–conv4 replaced by randomly initialised SeriesConv2d (default spec)."""
    torch.manual_seed(seed)
    model = models.build("four_layer")
    for name, spec in models.default_spec("four_layer").items():
        conv = getattr(model, name)
        setattr(model, name, SeriesConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                          spec["group_sizes"], spec["bottleneck"], padding=conv.padding))
    return model


@functools.lru_cache(maxsize=2)
def _embedded(augment):
    return data.load_embedded(augment=augment)


def small_embedded(n_train=128, n_val=64, augment=False):
    """The first n_train / n_val / n_val samples of the embedded train / val / test splits."""
    train, val, test = _embedded(augment)
    return Subset(train, range(n_train)), Subset(val, range(n_val)), Subset(test, range(n_val))


def tiny_demo_overrides(runs, budgets, spec):
    """`gross` CLI overrides that shrink the demo experiment to seconds: one epoch per stage,
    `runs` fine-tuning runs at `budgets` (YAML list), and the decomposition `spec` (YAML mapping)."""
    return ["--quiet", "--set", "data.limit=100",
            "--set", "train.epochs=1", "--set", "train.milestones=[]", "--set", "train.batch_size=256",
            "--set", "search_space.epochs=1", "--set", "search_space.milestones=[]",
            "--set", "finetune.epochs=1", "--set", "finetune.milestones=[]",
            "--set", "finetune.batch_size=256",
            "--set", f"reproduce.runs={runs}", "--set", f"reproduce.budgets={budgets}",
            "--set", "decompose.max_iter=3", "--set", f"decompose.spec={spec}"]


def tiny_image_folder(root, classes=3, train=8, val=4, size=32):
    """An ImageFolder tree root/train/digitC/*.png, root/val/digitC/*.png of embedded digits (distinct images)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        members = np.nonzero(digits.target == c)[0]
        for split, picked in (("train", members[:train]), ("val", members[train:train + val])):
            folder = root / split / f"digit{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in picked:
                image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
                image.resize((size, size)).save(folder / f"{i}.png")
    return root


def run_torchrun(script, folder, *args, timeout=400):
    """Run the Python source `script` under torchrun with 2 CPU processes (one thread each), this
    tree first on their path, as `worker.py FOLDER ARGS…` in `folder`; fails the test on an error."""
    path = folder / "worker.py"
    path.write_text(script)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    python_path = [here, root, os.path.join(root, "python"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(python_path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc_per_node", "2", str(path), str(folder), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
