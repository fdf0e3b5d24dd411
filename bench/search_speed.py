"""Search speed: configurations evaluated per second by gross.search.evaluate, prefix sharing on and off."""
import argparse
import os
import time

import torch

from gross import config, convert, models, search
from gross.latency import describe_device

INPUT = {"four_layer": (3, 32, 32), "vgg16_cifar": (3, 32, 32), "resnet18": (3, 224, 224)}


def _configs(model, count, order, seed):
    """`count` configurations: a run of consecutive ones in exhaustive (lexicographic) order from a
    random start ("exhaustive", as a search's chunks are), or independent random ones ("random")."""
    space = config.config_space(model)
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: {n: s[int(torch.randint(len(s), (), generator=generator))] for n, s in space.items()}  # noqa: E731
    if order == "random":
        return [draw() for _ in range(count)]
    names, out, current = list(space), [], draw()
    for _ in range(count):  # the next configuration in lexicographic order: an odometer on the last layers
        out.append(dict(current))
        for name in reversed(names):
            i = space[name].index(current[name])
            if i + 1 < len(space[name]):
                current[name] = space[name][i + 1]
                break
            current[name] = space[name][0]
    return out


def _rate(model, configs, loader, share):
    search.evaluate(model, configs[:1], loader, share_prefixes=share)  # warm-up: first calls, allocations
    wall, cpu = time.perf_counter(), time.process_time()
    search.evaluate(model, configs, loader, share_prefixes=share)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(configs) / wall, len(configs) / cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="four_layer,vgg16_cifar,resnet18")
    parser.add_argument("--configs", type=int, default=16, help="configurations per measurement (one pass)")
    parser.add_argument("--images", type=int, default=64, help="synthetic validation images")
    parser.add_argument("--batch", type=int, default=64, help="validation batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{describe_device('cpu')['name']}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.configs} configurations on {args.images} random images (batch {args.batch}); "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print("| network | input | configurations | order | prefix sharing | configs/s (wall) | configs/s (CPU time) |")
    print("|---|---|---:|---|---|---:|---:|")
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = convert(models.build(name), models.default_spec(name), init="random", progress=False).eval()
        images = torch.randn(args.images, *INPUT[name])
        labels = torch.randint(10, (args.images,))  # accuracy is not the point: any labels do
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=args.batch)
        for order in ("exhaustive", "random"):
            configs = _configs(model, args.configs, order, args.seed)
            for share in (True, False):
                wall, cpu = _rate(model, configs, loader, share)
                print(f"| {name} | {'×'.join(map(str, INPUT[name]))} | {search.space_size(model):,} | {order} | "
                      f"{'on' if share else 'off'} | {wall:.2f} | {cpu:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
