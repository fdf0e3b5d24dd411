"""What `auto` pays on first sight of a model's call signatures, and what it chose: search-space
training steps (every layer at each index of its series in turn, forward, backward, SGD step on the
series parameters, the rest frozen) and inference passes, on synthetic data.

    python bench/dispatch_cost.py --model vgg16_cifar --batch 128 [--threads 2] [--device cpu]

Prints, per pass, the first (deciding) step's seconds beside the median of the later ones, then
`gk.dispatch_report()`; writes the report rows as JSON.
"""
import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import gross_kernels as gk
from gross import config, models
from gross.decompose import convert

INPUT = {"four_layer": (3, 32, 32), "vgg16_cifar": (3, 32, 32), "resnet18": (3, 224, 224),
         "vgg16_imagenet": (3, 224, 224)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def search_space_model(name, device):
    """The paper's network with its default spec as randomly initialised series, rest frozen."""
    model = convert(models.build(name), models.default_spec(name), init="random", progress=False)
    series = {id(p) for layer in config.series_layers(model).values() for p in layer.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in series)
    return model.to(device)


def timed_steps(fn, steps, device):
    """Seconds of each of `steps` calls of fn."""
    out = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16_cifar", choices=sorted(INPUT))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (first decides)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/out/dispatch_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = search_space_model(args.model, device)
    space = config.config_space(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch, *INPUT[args.model], device=device)
    target = torch.randint(0, 10, (args.batch,), device=device)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {args.model}, batch {args.batch}, "
          f"{device} ({gk.backends.device_name(device)}), {args.threads} threads, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print("| configuration | pass | first step s | later steps s (median) |\n|---|---|---:|---:|")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    def inference():
        with torch.no_grad():
            model(x)

    depth = max(len(sizes) for sizes in space.values())
    for j in range(depth):
        config.set_config(model, {n: sizes[min(j, len(sizes) - 1)] for n, sizes in space.items()})
        for label, fn in (("train", train_step), ("inference", inference)):
            times = timed_steps(fn, args.steps, device)
            print(f"| size index {j} | {label} | {times[0]:.2f} | {statistics.median(times[1:]):.2f} |",
                  flush=True)
    print()
    rows = gk.dispatch_report()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.now(timezone.utc).isoformat(), "machine": platform.platform(),
                   "model": args.model, "batch": args.batch, "threads": args.threads,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
