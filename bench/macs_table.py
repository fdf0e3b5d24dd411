"""MACs of each paper network: original, and decomposed at its largest and smallest configuration."""
import argparse

from gross import config, convert, count_macs, macs, models

INPUT = {"four_layer": (3, 32, 32), "vgg16_cifar": (3, 32, 32), "vgg16_imagenet": (3, 224, 224),
         "resnet18": (3, 224, 224)}


def _rows():
    cases = [(name, models.default_spec(name)) for name in models.NAMES]
    cases.append(("vgg16_imagenet (high compression)", models.high_compression_spec()))
    for label, spec in cases:
        name = label.split()[0]
        model = models.build(name)
        original = count_macs(model, INPUT[name])
        model = convert(model, spec, init="random", progress=False)
        extremes = {}
        for key, cfg in (("largest", config.extreme_config(model, True)),
                         ("smallest", config.extreme_config(model, False))):
            config.set_config(model, cfg)
            extremes[key] = count_macs(model, INPUT[name])
        extra = {}
        if "high compression" in label:
            config.set_config(model, models.high_compression_config())
            extra["paper's config"] = count_macs(model, INPUT[name])
        yield label, INPUT[name], original, extremes, extra, model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-layer", action="store_true", help="also print each network's per-layer table")
    args = parser.parse_args()
    print("| network | input | original | largest config | smallest config | other |")
    print("|---|---|---:|---:|---:|---|")
    details = []
    for label, size, original, extremes, extra, model in _rows():
        other = ", ".join(f"{k}: {v:,}" for k, v in extra.items())
        print(f"| {label} | {'×'.join(map(str, size))} | {original:,} | {extremes['largest']:,} "
              f"({extremes['largest'] / original:.3f}×) | {extremes['smallest']:,} "
              f"({extremes['smallest'] / original:.3f}×) | {other} |")
        if args.per_layer:
            config.set_config(model, config.extreme_config(model, False))
            details.append((label, macs.format_table(count_macs(model, size, per_layer=True)[1])))
    for label, table in details:
        print(f"\n{label}, smallest configuration:\n\n{table}")


if __name__ == "__main__":
    main()
