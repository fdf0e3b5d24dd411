"""The `gross` command line: one subcommand per pipeline stage, experiment settings from YAML configs."""
import argparse
import dataclasses
import json
import os
import sys

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Keys each section of an experiment config may hold (recipe sections: gross.train.Recipe's fields).
_TOP = {"model", "num_classes", "weights", "seed", "device", "out", "data", "decompose", "train", "search_space",
        "search", "finetune", "reproduce"}
_SECTIONS = {
    "data": {"name", "root", "input_size", "eval_batch_size", "workers", "limit"},
    "decompose": {"spec", "init", "tol", "max_iter", "method", "workers"},
    "search": {"strategy", "beam", "configs_per_pass"},
    "reproduce": {"budgets", "runs"},
}
_RECIPE_SECTIONS = ("train", "search_space", "finetune")


class UsageError(Exception):
    """A user mistake: reported as one line on stderr, exit status 2."""


# --------------------------------------------------------------------------------------------
# Experiment configs

def shipped_configs():
    """Names of the experiment configs shipped in gross/configs."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def _config_path(name):
    if os.path.isfile(name):
        return name
    shipped = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.isfile(shipped):
        return shipped
    raise UsageError(f"config {name!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def _check_keys(cfg, origin):
    from gross.train import Recipe

    if not isinstance(cfg, dict):
        raise UsageError(f"{origin}: an experiment config must be a YAML mapping")
    missing = sorted(_TOP - {"weights", "num_classes", "seed", "device"} - set(cfg))
    if missing:
        raise UsageError(f"{origin}: missing keys {missing}")
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    allowed = dict(_SECTIONS, **{s: recipe_fields for s in _RECIPE_SECTIONS})
    unknown = [k for k in cfg if k not in _TOP]
    for section, keys in allowed.items():
        if not isinstance(cfg[section], dict):
            raise UsageError(f"{origin}: {section} must be a mapping")
        unknown += [f"{section}.{k}" for k in cfg[section] if k not in keys]
    if unknown:
        raise UsageError(f"{origin}: unknown keys {unknown}")


def apply_override(cfg, text):
    """Apply one `key.sub=value` override in place; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UsageError(f"--set {text!r}: the value is not valid YAML ({err.__class__.__name__})") from err
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise UsageError(f"--set {text!r}: {'.'.join(parents[:i + 1])} is not a section of the config")
        node = node[part]
    node[leaf] = value


def load_config(name, overrides=(), device=None, data_root=None, out=None):
    """An experiment config (a file or a shipped name) with `--set` overrides and the common options applied."""
    path = _config_path(name)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    _check_keys(cfg, path)
    for text in overrides:
        apply_override(cfg, text)
    for key, value in (("device", device), ("out", out)):
        if value is not None:
            cfg[key] = value
    if data_root is not None:
        cfg["data"]["root"] = data_root
    _check_keys(cfg, f"{path} with --set overrides")
    return cfg


# --------------------------------------------------------------------------------------------
# Subcommands

def _experiment(args, **kw):
    from gross.reproduce import Experiment

    cfg = load_config(args.config, args.set, args.device, args.data_root, args.out)
    return Experiment(cfg, progress=not args.quiet, **kw)


def _model_from(exp, checkpoint_path, default):
    from gross.reproduce import load_model

    path = checkpoint_path or exp.path(default)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist" + ("" if checkpoint_path else
                         f": run the earlier stages first (gross reproduce runs them all)"))
    return load_model(path)[0].to(exp.device)


def _group_config(exp, model, text):
    from gross.reproduce import resolve_config

    if text is None:
        raise UsageError("--group-config is required: a group size N (every layer at N), 'original', "
                         "'largest', 'smallest', a YAML mapping layer: size, or a YAML file of one")
    return resolve_config(exp.name, model, _yaml_arg(text, "--group-config"))


def _yaml_arg(text, option):
    """A command-line value given as YAML inline or as the path of a YAML file."""
    try:
        if os.path.isfile(text):
            with open(text) as f:
                return yaml.safe_load(f)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"{option} {text!r}: not valid YAML ({str(err).splitlines()[0]})") from err


def cmd_train(args):
    exp = _experiment(args)
    exp.base()
    print(f"trained network: {exp.path('base.pt')}")


def cmd_decompose(args):
    from gross.macs import count_macs
    from gross.config import extreme_config, set_config

    exp = _experiment(args, chain=False)
    model = exp.decomposed()
    for which in ("largest", "smallest"):
        set_config(model, extreme_config(model, which == "largest"))
        print(f"{which} configuration: {count_macs(model, exp.input_size):,} MACs")
    print(f"series model: {exp.path('series_init.pt')}")


def cmd_train_space(args):
    exp = _experiment(args, chain=False)
    exp.search_space()
    print(f"trained search space: {exp.path('series.pt')}")


def cmd_search(args):
    from gross import search
    from gross.reproduce import config_string, resolve_config, write_json

    exp = _experiment(args)
    model = _model_from(exp, args.checkpoint, "series.pt")
    budget = args.budget
    if args.budget_config is not None:
        if budget is not None:
            raise UsageError("give either --budget or --budget-config, not both")
        _, config = resolve_config(exp.name, model, _yaml_arg(args.budget_config, "--budget-config"))
        budget = search.MacsTable(model, exp.input_size)(config)
    result = exp.search(model, budget)
    print(f"{len(result.ranked)} configurations within budget {budget if budget is None else f'{budget:,}'} MACs; "
          f"layers {', '.join(search.config_space(model))}")
    print("| rank | configuration | MACs | val acc |\n|---:|---|---:|---:|")
    for i, e in enumerate(result.ranked[:args.top]):
        print(f"| {i + 1} | {config_string(e.config)} | {e.macs:,} | {100 * e.accuracy:.2f} % |")
    print("Pareto front: " + ", ".join(f"{config_string(e.config)} ({e.macs:,}, {100 * e.accuracy:.2f} %)"
                                       for e in result.pareto))
    write_json(exp.path("search_result.json"), {"budget_macs": budget,
                                                "ranked": [e.to_json() for e in result.ranked],
                                                "pareto": [e.to_json() for e in result.pareto]})


def cmd_finetune(args):
    from gross.reproduce import config_string

    exp = _experiment(args, chain=False)
    config = _group_config(exp, exp.skeleton(), args.group_config)[1]
    for run in range(args.runs):
        r = exp.finetune(config, run)
        print(f"{config_string(config)} run {run + 1}: {r['macs']:,} MACs, val {100 * r['val_acc']:.2f} %, "
              f"test {100 * r['test_acc']:.2f} %")


def cmd_evaluate(args):
    from gross.config import series_layers, set_config
    from gross.macs import count_macs

    exp = _experiment(args)
    default = "series.pt" if os.path.isfile(exp.path("series.pt")) else "base.pt"
    model = _model_from(exp, args.checkpoint, default)
    if series_layers(model) and args.group_config is not None:
        set_config(model, _group_config(exp, model, args.group_config)[1])
    metrics = exp.accuracies(model)
    print(json.dumps({"macs": count_macs(model, exp.input_size), **metrics}))


def cmd_export(args):
    import torch

    from gross import export

    exp = _experiment(args)
    model = _model_from(exp, args.checkpoint, "series.pt")
    label, config = _group_config(exp, model, args.group_config)
    plain = export.to_plain(model, config).cpu().eval()
    example = torch.randn(1, *exp.input_size)
    stem = exp.path("exported", f"{label}")
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    for fmt in formats:
        if fmt == "pt":
            print(export.save(plain, f"{stem}.pt"))
        elif fmt == "program":
            torch.export.save(export.export_program(plain, example), f"{stem}.pt2")
            print(f"{stem}.pt2")
        elif fmt == "onnx":
            try:
                print(export.export_onnx(plain, example, f"{stem}.onnx"))
            except RuntimeError as err:
                raise UsageError(str(err)) from err
        else:
            raise UsageError(f"--format: unknown format {fmt!r}; choose from pt, program, onnx")


def cmd_reproduce(args):
    exp = _experiment(args)
    table = exp.reproduce()
    print(table)
    print(f"\nwritten under {exp.out}: table.md, results.csv, results.json, pareto.png, exported/")


def cmd_demo(args):
    import time

    start = time.time()
    args.config = args.config or "demo"
    cmd_reproduce(args)
    print(f"demo finished in {time.time() - start:.0f} s")


# --------------------------------------------------------------------------------------------

_COMMANDS = {
    "train": (cmd_train, "train the network from scratch (the config's `train` recipe), or load `weights`"),
    "decompose": (cmd_decompose, "decompose the trained network into group-size series (needs `gross train`)"),
    "train-space": (cmd_train_space, "train the search space: a random configuration per step"),
    "search": (cmd_search, "rank configurations of the trained search space under a MACs budget"),
    "finetune": (cmd_finetune, "decompose at one configuration alone and fine-tune it"),
    "evaluate": (cmd_evaluate, "validation and test accuracy (and MACs) of a model file"),
    "export": (cmd_export, "export one configuration as plain PyTorch (.pt), torch.export (.pt2) or ONNX"),
    "reproduce": (cmd_reproduce, "the headline experiment end to end: uniform vs searched configurations"),
    "demo": (cmd_demo, "`reproduce` on the 4-layer net with the embedded digits and short schedules"),
}


def build_parser():
    """The argument parser of the `gross` command."""
    parser = argparse.ArgumentParser(prog="gross", description="GroSS: group-size series decomposition, "
                                     "search and fine-tuning. Experiment configs: " + ", ".join(shipped_configs()))
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, text) in _COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(fn=fn)
        p.add_argument("--config", required=name != "demo", default=None,
                       help="experiment config: a YAML file or a shipped name" + (" (default: demo)"
                                                                                  if name == "demo" else ""))
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set finetune.epochs=10 (repeatable)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
        p.add_argument("--data-root", help="dataset folder (overrides data.root)")
        p.add_argument("--out", help="output folder (overrides out)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("search", "evaluate", "export"):
            p.add_argument("--checkpoint", help="model file (default: the stage's file under --out)")
        if name in ("finetune", "evaluate", "export"):
            p.add_argument("--group-config", help="N (every layer at N), original, largest, smallest, "
                                                  "or a YAML mapping layer: group size (inline or a file)")
        if name == "search":
            p.add_argument("--budget", type=float, help="MACs budget")
            p.add_argument("--budget-config", help="budget = the MACs of this configuration (e.g. 4)")
            p.add_argument("--top", type=int, default=10, help="rows of the ranking to print")
        if name == "finetune":
            p.add_argument("--runs", type=int, default=1, help="fine-tuning runs (seeds seed, seed+1, …)")
        if name == "export":
            p.add_argument("--format", default="pt", help="comma-separated: pt, program, onnx")
    return parser


def main(argv=None):
    """Entry point of the `gross` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.out is None:
        args.out = "gross-demo"
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("gross: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, FileNotFoundError, KeyError) as err:
        if args.traceback:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gross {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
