"""Stage 5: images per second of a search-space training step and of inference, the figure users feel.

Training: a random group size per series layer per step (gross.config.sample_config), forward,
backward and SGD step on one synthetic batch kept on the device, with the search recipe's
precision, trainable set and batch-norm handling (gross.train's "<net>/search": series factors
only, AMP float16 on CUDA); backends `auto`, `reference` and the released approach (`naive`:
every term expanded by loops on every step, bench/naive_gross.py), beside a training step of
the original dense network (all its parameters, same batch and precision) as the yardstick.
Inference: the dense network against one exported configuration (every layer at group size 16,
gross.export.to_plain). Warm-up first: every group size of every layer once, so compilation,
autotuning and `auto`'s first-sight decisions stay out of the timings.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from gross import config as gconfig
from gross import convert, export, models, train
from gross.decompose.model import replace_module
from kernels import sync
from naive_gross import ReleasedSeries

TITLE = "5. End-to-end throughput (images/s)"
# (network, batch, resolution) as the issue gives them.
NETWORKS = (("vgg16_cifar", 128, 32), ("four_layer", 128, 32), ("resnet18", 64, 224))
VARIANTS = ("dense", "auto", "reference", "naive")
EXPORT_GROUP_SIZE = 16
WINDOW_S, MIN_STEPS, MAX_STEPS = 2.0, 3, 200


def build(name, variant, device):
    """Network `name` as the dense original, or its series model run by `variant`'s backend."""
    model = models.build(name)
    if variant != "dense":
        convert(model, models.default_spec(name), init="random", progress=False)
        for layer_name, layer in gconfig.series_layers(model).items():
            if variant == "naive":
                replace_module(model, layer_name, ReleasedSeries(layer))
            else:
                layer.backend = variant
    return model.to(device)


def levels(model):
    """Configurations that together visit every group size of every series layer once."""
    return gconfig.levels(gconfig.config_space(model))


def training_step(name, model, device, batch, res):
    """step(config=None): one search-space training step (a sampled configuration unless given)."""
    recipe = train.get_recipe(f"{name}/search")
    layers = gconfig.series_layers(model).values()
    series = [p for layer in layers for group in (layer.firsts, layer.cores, layer.lasts)
              for p in group]
    params = series or list(model.parameters())
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.train()
    if series and recipe.freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
    amp = recipe.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(_classes(model), (batch,), device=device)
    generator = torch.Generator().manual_seed(0)

    def step(config=None):
        if config:
            gconfig.set_config(model, config)
        elif series:
            gconfig.sample_config(model, generator)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step, amp


def _classes(model):
    """The network's number of classes: its last linear layer's outputs."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def _inference_step(model, device, batch, res, amp):
    model.eval()
    x = torch.randn(batch, 3, res, res, device=device)

    def step(config=None):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            model(x)

    return step


def _rate(step, warm_up, device, batch, quick):
    """images/s of step() over about WINDOW_S, after step(config) for every warm-up config; the
    count of steps comes from one timed step, so the GPU never runs far behind the clock."""
    for config in warm_up:
        step(config)
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    one = time.perf_counter() - start
    steps = 1 if quick else int(min(MAX_STEPS, max(MIN_STEPS, WINDOW_S / one)))
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"steps": steps, "timed_s": round(seconds, 4), "images_per_s": steps * batch / seconds,
            "step_ms": 1e3 * seconds / steps}


def _train_item(name, variant, device, batch, res, quick):
    model = build(name, variant, device)
    step, amp = training_step(name, model, device, batch, res)
    # naive compiles and tunes nothing: one step warms it up (each of its steps is slow)
    warm_up = [None] if variant == "dense" else levels(model)
    if variant == "naive" or quick:
        warm_up = warm_up[:1]
    row = _rate(step, warm_up, device, batch, quick)
    return dict(row, precision="amp float16" if amp else "float32", batch=batch, resolution=res)


def _inference_item(name, exported, device, batch, res, quick):
    amp = train.get_recipe(f"{name}/search").amp and device.type == "cuda"
    model = build(name, "auto" if exported else "dense", device)
    if exported:
        config = gconfig.uniform_config(model, EXPORT_GROUP_SIZE)
        model = export.to_plain(model, config)
    step = _inference_step(model, device, batch, res, amp)
    row = _rate(step, [None] if not quick else [], device, batch, quick)
    return dict(row, precision="amp float16" if amp else "float32", batch=batch, resolution=res)


def run(ctx):
    """Time training (every variant) and inference (dense, exported) per network."""
    plan = []
    for name, batch, res in NETWORKS:
        shape = (ctx.device, *((2, 32) if ctx.quick else (batch, res)), ctx.quick)
        plan += [(f"{name} | train | {v}", _train_item, (name, v, *shape)) for v in VARIANTS]
        plan += [(f"{name} | inference | {label}", _inference_item, (name, exported, *shape))
                 for label, exported in (("dense", False), (f"exported G={EXPORT_GROUP_SIZE}", True))]
    ctx.plan(key for key, _, _ in plan)
    for key, fn, args in plan:
        ctx.item(key, lambda: fn(*args))
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def _table(data):
    """{net: {(mode, variant): row}} of the items that ran."""
    out = {}
    for key, row in data.get("items", {}).items():
        net, mode, variant = key.split(" | ")
        out.setdefault(net, {})[(mode, variant)] = row
    return out


def _ips(row):
    return row["images_per_s"] if row and row["status"] == "ok" else float("nan")


def render(data):
    """The training and inference tables with their ratios to the targets."""
    lines = ["Training: search-space step (random group size per layer per step); "
             "dense: the original network's training step. '×dense step' is the step time over "
             "the dense network's (target ≤ 1.5); '×naive' the speed over the released approach "
             "(target ≥ 10 on VGG-16 CIFAR).", "",
             "| network | batch, px | precision | variant | images/s | step ms | ×dense step | ×naive |",
             "|---|---|---|---|---|---|---|---|"]
    for net, rows in _table(data).items():
        dense, naive = _ips(rows.get(("train", "dense"))), _ips(rows.get(("train", "naive")))
        for (mode, variant), row in rows.items():
            if mode != "train":
                continue
            if row["status"] != "ok":
                lines.append(f"| {net} | | | {variant} | {row['status']}: "
                             f"{row.get('error', row.get('reason', ''))} | | | |")
                continue
            ips = row["images_per_s"]
            lines.append(f"| {net} | {row['batch']}, {row['resolution']} | {row['precision']} | "
                         f"{variant} | {ips:.0f} | {row['step_ms']:.1f} | {dense / ips:.2f} | "
                         f"{ips / naive:.2f} |")
    lines += ["", "| network | inference | images/s | × dense |", "|---|---|---|---|"]
    for net, rows in _table(data).items():
        dense = _ips(rows.get(("inference", "dense")))
        for (mode, variant), row in rows.items():
            if mode == "inference":
                ips = _ips(row)
                lines.append(f"| {net} | {variant} | {ips:.0f} | {ips / dense:.2f} |"
                             if row["status"] == "ok" else
                             f"| {net} | {variant} | {row['status']}: "
                             f"{row.get('error', row.get('reason', ''))} | |")
    return "\n".join(lines)


def summary(data):
    """One line per network: auto's images/s and its ratios to naive and dense."""
    parts = []
    for net, rows in _table(data).items():
        auto = _ips(rows.get(("train", "auto")))
        dense, naive = _ips(rows.get(("train", "dense"))), _ips(rows.get(("train", "naive")))
        parts.append(f"{net}: auto {auto:.0f} img/s, ×{auto / naive:.1f} naive, step "
                     f"{dense / auto:.2f}× dense")
    return "; ".join(parts) or "nothing ran"
