"""Training recipes (from scratch, search-space, fine-tuning) on one resumable, DDP-aware `fit` loop."""
import csv
import dataclasses
import io
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gross_kernels.files import atomic_write, atomic_write_json

from gross import checkpoint, distributed
from gross.settings import Recipe
from gross.config import extreme_config, get_config, sample_config, series_layers, set_config
from gross.models import build

CHECKPOINT_NAME = "checkpoint.pt"


_SEARCH = {"sample": True, "series_only": True, "weight_decay": 0.0}

# DESIGN.md §4 (the appendix and the released configs). Batch sizes and weight decay are not
# stated there; 128 (CIFAR) / 64 (ImageNet) and 5e-4 (none for search-space training) are ours.
RECIPES = {
    "four_layer/scratch": Recipe(epochs=100, lr=0.1, milestones=(50, 75), runs=5),
    "four_layer/search": Recipe(epochs=150, lr=1e-4, milestones=(80, 120), **_SEARCH),
    "four_layer/finetune": Recipe(epochs=100, lr=1e-3, milestones=(80,)),
    "vgg16_cifar/scratch": Recipe(epochs=200, lr=0.05, milestones=(100, 150)),
    "vgg16_cifar/search": Recipe(epochs=200, lr=1e-4, milestones=(100, 150), **_SEARCH),
    "vgg16_cifar/finetune": Recipe(epochs=100, lr=1e-3, milestones=(80,)),
    "vgg16_imagenet/search": Recipe(epochs=4, lr=1e-5, milestones=(2,), batch_size=64, **_SEARCH),
    "vgg16_imagenet/finetune_high_compression": Recipe(epochs=14, lr=5e-4, milestones=(8, 12), batch_size=64),
    "resnet18/search": Recipe(epochs=8, lr=5e-5, milestones=(4, 6), batch_size=64, freeze_bn=True, **_SEARCH),
}


def get_recipe(name, **overrides):
    """A named recipe from RECIPES (e.g. 'four_layer/search'), with fields replaced by `overrides`."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return dataclasses.replace(RECIPES[name], **overrides)


class NonFiniteError(FloatingPointError):
    """Training met a NaN or infinite loss and stopped (the checkpoint on disk is the last good epoch's), or a
    model's outputs are not finite when it is scored."""


@dataclasses.dataclass
class FitResult:
    """What fit returns: the trained (unwrapped) model and one metrics dict per epoch."""

    model: nn.Module
    history: list


def _trainable_params(model, recipe):
    """Set requires_grad per the recipe; returns (params to optimise, previous requires_grad flags)."""
    before = {p: p.requires_grad for p in model.parameters()}
    if recipe.series_only:
        layers = series_layers(model).values()
        if not layers:
            raise ValueError("recipe trains only series layers (series_only=True) but the model has no SeriesConv2d")
        keep = {id(p) for layer in layers for group in (layer.firsts, layer.cores, layer.lasts) for p in group}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters under this recipe")
    return params, before


def _set_train_mode(model, recipe):
    model.train()
    if recipe.freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def accuracy(model, loader, device=None):
    """Top-1 accuracy in [0, 1] of `model` on `loader` (summed over processes when distributed)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = broken = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            correct += (out.argmax(1) == y).sum().item()
            broken += (~torch.isfinite(out)).any(1).sum().item()  # argmax would score them as a class
            total += y.numel()
    model.train(was_training)
    correct, total, broken = distributed.all_sum([correct, total, broken], device)
    if total == 0:
        raise ValueError("accuracy: the loader yielded no samples")
    if broken:
        raise NonFiniteError(f"accuracy: the model's outputs are not finite (NaN or inf) on {int(broken)} of "
                             f"{int(total)} samples: the network has diverged")
    return correct / total


def _rng_state():
    kind, keys, *rest = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), *rest], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _write_metrics(out_dir, history):
    atomic_write_json(os.path.join(out_dir, "metrics.json"), history)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, list(dict.fromkeys(k for row in history for k in row)))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(os.path.join(out_dir, "metrics.csv"), text.getvalue())


def _tensorboard(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _evaluate(model, loader, device, recipe):
    """Validation metrics; a search space is scored at its largest and smallest configurations."""
    if not recipe.sample:
        return {"val_acc": accuracy(model, loader, device)}
    active = get_config(model)
    metrics = {}
    for key, largest in (("val_acc_largest", True), ("val_acc_smallest", False)):
        set_config(model, extreme_config(model, largest))
        metrics[key] = accuracy(model, loader, device)
    set_config(model, active)
    return metrics


def _stop_if_not_finite(loss, name, epoch, step, lr, ckpt_path, device):
    """Raise NonFiniteError unless `loss` is finite on every process (all stop at the same step)."""
    # One synchronisation per step: stopping at the first bad loss keeps NaN weights from any update.
    if distributed.all_true(torch.isfinite(loss.detach()), device):
        return
    kept = (f"the last good checkpoint {ckpt_path!r} is kept" if ckpt_path and os.path.isfile(ckpt_path)
            else "no checkpoint was written before it")
    advice = ("the network it starts from already gives non-finite outputs on this data" if (epoch, step) == (0, 0)
              else "lower the learning rate")
    raise NonFiniteError(f"{name}: the loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} (lr {lr:g}): "
                         f"training stopped; {kept}; {advice}")


def fit(model, train_loader, val_loader, recipe, out_dir=None, device=None, resume=False, seed=0,
        progress=True, callback=None, name="fit"):
    """Train `model` with `recipe`; checkpoint every epoch to out_dir and, with resume=True, continue exactly.

    The train loader must use a DistributedSampler (gross.data.make_loaders does). Under torchrun
    the process group is joined from the env and the model wrapped in DDP. The checkpoint holds
    model, optimizer, scheduler, grad scaler, epoch, history and every RNG state (per process),
    so a resumed run reproduces the uninterrupted one. `callback(epoch, step)` runs after each
    optimizer step. A NaN or infinite loss stops training at once with NonFiniteError naming
    `name` (the stage), the epoch, step and learning rate; the checkpoint of the last finished
    epoch stays as it is. Returns FitResult(model, history).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a gross.train.Recipe, got {type(recipe).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    sampler = getattr(train_loader, "sampler", None)
    if not hasattr(sampler, "set_epoch"):
        raise ValueError("train_loader must use a sampler with set_epoch (e.g. from gross.data.make_loaders)")
    rank, world = distributed.init_from_env()
    if getattr(sampler, "num_replicas", 1) != world:
        raise ValueError(f"train_loader is split for {sampler.num_replicas} processes but {world} are running: "
                         "build the loaders after the process group is initialised")
    device = torch.device(device) if device is not None else distributed.default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    params, requires_grad_before = _trainable_params(model, recipe)
    use_amp = recipe.amp and device.type == "cuda"
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones), recipe.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    sample_gen = torch.Generator().manual_seed(seed)  # same on every process, so all draw the same configs
    # A term above a sampled group size gets no gradient from the ops; kept at zero instead (not
    # None), SGD's momentum still moves it, as in the released search-space training.
    keep_zero_grads = recipe.sample
    if keep_zero_grads:
        for p in params:
            p.grad = torch.zeros_like(p)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=recipe.sample)
    signature = {"model": checkpoint.model_signature(model), "recipe": recipe.to_dict(), "seed": seed,
                 "world_size": world, "amp": use_amp}
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME) if out_dir is not None else None
    history, start_epoch = [], 0
    if resume and os.path.isfile(ckpt_path):
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the model's device.
        state = checkpoint.load(ckpt_path, signature, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        sample_gen.set_state(state["sample_generator"])
        _set_rng_state(state["rng"][rank])
        history, start_epoch = state["history"], state["epoch"]
    else:
        seed_everything(seed + rank)
    main = distributed.is_main()
    writer = _tensorboard(out_dir) if out_dir is not None and main else None
    if out_dir is not None and main:
        os.makedirs(out_dir, exist_ok=True)
    try:
        for epoch in range(start_epoch, recipe.epochs):
            start = time.time()
            sampler.set_epoch(epoch)
            _set_train_mode(net, recipe)
            # Sums stay on the device: a .item() per step would synchronise the GPU every step.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False,
                       disable=not (progress and main))
            for step, (x, y) in enumerate(bar):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if recipe.sample:
                    sample_config(model, sample_gen)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    out = net(x)
                    loss = F.cross_entropy(out, y)
                _stop_if_not_finite(loss, name, epoch, step, optimizer.param_groups[0]["lr"], ckpt_path, device)
                optimizer.zero_grad(set_to_none=not keep_zero_grads)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().double() * y.numel()
                correct += (out.argmax(1) == y).sum()
                seen += y.numel()
                if progress and main and step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if callback is not None:
                    callback(epoch, step)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss_sum, correct, seen = distributed.all_sum([loss_sum.item(), correct.item(), seen], device)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen}
            row.update(_evaluate(model, val_loader, device, recipe))
            row["seconds"] = time.time() - start
            history.append(row)
            if out_dir is not None:
                _save_state(ckpt_path, signature, model, optimizer, scheduler, scaler, sample_gen, history,
                            epoch + 1)
                if main:
                    _write_metrics(out_dir, history)
                    if writer is not None:
                        for key, value in row.items():
                            writer.add_scalar(key, value, epoch + 1)
    finally:
        if writer is not None:
            writer.close()
        for p, flag in requires_grad_before.items():
            p.requires_grad_(flag)
    return FitResult(model, history)


def _save_state(path, signature, model, optimizer, scheduler, scaler, sample_gen, history, epoch):
    rng = distributed.all_gather(_rng_state())  # every process's RNG, so each resumes its own stream
    if distributed.is_main():
        checkpoint.save(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                               "sample_generator": sample_gen.get_state(), "rng": rng, "history": history,
                               "epoch": epoch}, signature)
    distributed.barrier()


def train_from_scratch(name, loaders, recipe, out_dir=None, seed=0, device=None, resume=False, progress=True,
                       num_classes=None, model_kwargs=None):
    """Train network `name` (a gross.models source) from scratch recipe.runs times (seeds seed, seed+1, …); keep the median run.

    `loaders` = (train, val, test); runs are ranked by validation accuracy. Returns
    (model of the median run, list of per-run dicts with seed, val_acc, test_acc, history).
    """
    train_loader, val_loader, test_loader = loaders
    runs = []
    for i in range(recipe.runs):
        torch.manual_seed(seed + i)
        model = build(name, num_classes=num_classes, kwargs=model_kwargs)
        run_dir = None if out_dir is None else os.path.join(out_dir, f"run{i}")
        result = fit(model, train_loader, val_loader, recipe, run_dir, device, resume, seed + i, progress,
                     name=f"train (run {i + 1} of {recipe.runs})")
        runs.append({"run": i, "seed": seed + i, "val_acc": accuracy(model, val_loader),
                     "test_acc": accuracy(model, test_loader), "history": result.history,
                     "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}})
    order = sorted(range(len(runs)), key=lambda i: runs[i]["val_acc"])
    chosen = runs[order[(len(runs) - 1) // 2]]
    model.load_state_dict(chosen["state"])
    for r in runs:
        del r["state"]
    if out_dir is not None and distributed.is_main():
        atomic_write_json(os.path.join(out_dir, "runs.json"), {"median_run": chosen["run"], "runs": runs})
    return model, runs


def train_search_space(model, train_loader, val_loader, recipe, **kwargs):
    """Search-space training of a converted model: a random configuration per step, only series factors trained.

    `recipe` must have sample=True (e.g. RECIPES['four_layer/search']); other arguments as fit().
    """
    if not recipe.sample:
        raise ValueError("search-space training needs a recipe with sample=True")
    return fit(model, train_loader, val_loader, recipe, **kwargs)


def finetune(model, config, train_loader, val_loader, recipe, **kwargs):
    """Fine-tune `model` at the fixed configuration `config` (every series layer named); other arguments as fit()."""
    if recipe.sample:
        raise ValueError("fine-tuning needs a recipe with sample=False")
    set_config(model, config, complete=True)
    return fit(model, train_loader, val_loader, recipe, **kwargs)
