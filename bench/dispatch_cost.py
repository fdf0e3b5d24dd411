"""What `auto` pays on first sight of a model's call signatures, and what it chose: search-space
training steps (every layer at each index of its series in turn, forward, backward, SGD step on the
series parameters, the rest frozen) and inference passes, on synthetic data.

    python bench/dispatch_cost.py --model vgg16_cifar --batch 128 [--threads 2] [--device cpu]

Prints, per pass, the first (deciding) step's seconds beside the median of the later ones, then
`gk.dispatch_report()`; writes the report rows as JSON.
"""
import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import gross_kernels as gk
from gpu_stages import throughput
from gross_kernels.files import atomic_write_json
from kernels import sync
from macs_table import INPUT


def timed_steps(fn, steps, device):
    """Seconds of each of `steps` calls of fn."""
    out = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
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
    channels, res, _ = INPUT[args.model]
    model = throughput.build(args.model, "auto", device)
    train_step, _ = throughput.training_step(args.model, model, device, args.batch, res)
    x = torch.randn(args.batch, channels, res, res, device=device)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {args.model}, batch {args.batch}, "
          f"{device} ({gk.backends.device_name(device)}), {args.threads} threads, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print("| configuration | pass | first step s | later steps s (median) |\n|---|---|---:|---:|")

    def inference():
        with torch.no_grad():
            model(x)

    for j, config in enumerate(throughput.levels(model)):
        for label, fn in (("train", lambda: train_step(config)), ("inference", inference)):
            times = timed_steps(fn, args.steps, device)
            print(f"| size index {j} | {label} | {times[0]:.2f} | {statistics.median(times[1:]):.2f} |",
                  flush=True)
    print()
    atomic_write_json(args.out, {"date": datetime.now(timezone.utc).isoformat(),
                                 "machine": platform.platform(), "model": args.model,
                                 "batch": args.batch, "threads": args.threads,
                                 "rows": gk.dispatch_report()})


if __name__ == "__main__":
    main()
