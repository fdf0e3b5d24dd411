"""The `gross` command line: one subcommand per pipeline stage, experiment settings from YAML configs."""
import argparse
import json
import os
import sys

from gross.settings import load_config, shipped_configs, yaml_load


def _experiment(args, chain=True, check=True):
    """The Experiment of the command's config and options, checked (unless not `check`) before any stage writes."""
    from gross.experiment import Experiment

    exp = Experiment(load_config(args.config, args.set, args.device, args.data_root, args.out),
                     progress=not args.quiet, chain=chain)
    if check:
        exp.check()
    return exp


def _model_from(exp, checkpoint_path, default):
    path = checkpoint_path or exp.path(default)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist" + ("" if checkpoint_path else
                         ": run the earlier stages first (gross reproduce runs them all)"))
    return exp.load(path)


def _yaml_arg(text, option):
    """A command-line value given as YAML inline or as the path of a YAML file."""
    what = f"{option} {text!r}"
    if os.path.isfile(text):
        with open(text) as f:
            return yaml_load(f, what)
    return yaml_load(text, what)


def _group_config(exp, model, text):
    if text is None:
        raise ValueError("--group-config is required: a group size N (every layer at N), 'original', "
                         "'largest', 'smallest', a YAML mapping layer: size, or a YAML file of one")
    return exp.named_config(model, _yaml_arg(text, "--group-config"))


def cmd_train(args):
    from gross.stages.train import trained

    exp = _experiment(args)
    trained(exp)
    print(f"trained network: {exp.path('base.pt')}")


def cmd_decompose(args):
    from gross.config import extreme_config, set_config
    from gross.macs import count_macs
    from gross.stages.decompose import decomposed

    exp = _experiment(args, chain=False)
    model = decomposed(exp)
    for which in ("largest", "smallest"):
        set_config(model, extreme_config(model, which == "largest"))
        print(f"{which} configuration: {count_macs(model, exp.input_size):,} MACs")
    print(f"series model: {exp.path('series_init.pt')}")


def cmd_train_space(args):
    from gross.stages.space import trained_space

    exp = _experiment(args, chain=False)
    trained_space(exp)
    print(f"trained search space: {exp.path('series.pt')}")


def cmd_profile(args):
    from gross import latency
    from gross.stages.profile import profile

    exp = _experiment(args)
    # Latency depends on the architecture, not on the weights: without a checkpoint random factors do.
    model = _model_from(exp, args.checkpoint, "series.pt") if args.checkpoint else exp.skeleton()
    table = profile(exp, model)
    print(latency.format_table(table))
    print(f"latency table: {table.path}")


def cmd_search(args):
    from gross_kernels.files import atomic_write_json

    from gross import distributed, search
    from gross.config import config_string
    from gross.plots import pareto_plot
    from gross.stages.profile import latency_budget
    from gross.stages.search import search as run_search

    distributed.init_from_env()  # under torchrun: before the loaders, so that each process gets its shard
    exp = _experiment(args)
    model = _model_from(exp, args.checkpoint, "series.pt")
    budget = args.budget
    if args.budget_config is not None:
        if budget is not None:
            raise ValueError("give either --budget or --budget-config, not both")
        _, config = exp.named_config(model, _yaml_arg(args.budget_config, "--budget-config"))
        budget = search.MacsTable(model, exp.input_size)(config)
    s = exp.settings.search
    if args.latency_ms is not None or args.latency_of is not None:  # the command line replaces the config's
        if args.latency_ms is not None and args.latency_of is not None:
            raise ValueError("give either --latency-ms or --latency-of, not both")
        latency_of = None if args.latency_of is None else _yaml_arg(args.latency_of, "--latency-of")
        table, budget_ms = latency_budget(exp, model, args.latency_ms, latency_of)
    else:
        table, budget_ms = latency_budget(exp, model, s.latency_ms, s.latency_of)
    result = run_search(exp, model, budget, latency=table, budget_ms=budget_ms)
    if not distributed.is_main():
        return
    budgets = ([] if budget is None else [f"{budget:,} MACs"]) + ([] if budget_ms is None else [f"{budget_ms:.4g} ms"])
    print(f"{len(result.ranked)} configurations within budget {' and '.join(budgets) or None}; "
          f"layers {', '.join(search.config_space(model))}")
    timed = table is not None
    print("| rank | configuration | MACs |" + (" latency (ms) |" if timed else "") + " val acc |")
    print("|---:|---|---:|" + ("---:|" if timed else "") + "---:|")
    for i, e in enumerate(result.ranked[:args.top]):
        cells = [str(i + 1), config_string(e.config), f"{e.macs:,}", *([f"{e.latency_ms:.4f}"] if timed else []),
                 f"{100 * e.accuracy:.2f} %"]
        print("| " + " | ".join(cells) + " |")
    for label, front in (("Pareto front", result.pareto), ("Pareto front by latency", result.pareto_latency)):
        if front:
            print(f"{label}: " + ", ".join(f"{config_string(e.config)} ({e.macs:,}, "
                                           + (f"{e.latency_ms:.4f} ms, " if timed else "")
                                           + f"{100 * e.accuracy:.2f} %)" for e in front))
    atomic_write_json(exp.path("search_result.json"), {"budget_macs": budget, "budget_ms": budget_ms,
                                                       "latency_table": table and table.path,
                                                       "ranked": [e.to_json() for e in result.ranked],
                                                       "pareto": [e.to_json() for e in result.pareto],
                                                       "pareto_latency": [e.to_json()
                                                                          for e in result.pareto_latency or []]})
    print(f"Pareto plot: {pareto_plot(exp.path('search_pareto.png'), result.evaluated, [], f'GroSS search: {exp.name}')}")


def cmd_finetune(args):
    from gross.config import config_string
    from gross.stages.finetune import finetune

    exp = _experiment(args, chain=False)
    config = _group_config(exp, exp.skeleton(), args.group_config)[1]
    for run in range(args.runs):
        r = finetune(exp, config, run)
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
    print(json.dumps({"macs": count_macs(model, exp.input_size), **exp.accuracies(model)}))


def cmd_export(args):
    import torch

    from gross import export

    exp = _experiment(args)
    model = _model_from(exp, args.checkpoint, "series.pt")
    label, config = _group_config(exp, model, args.group_config)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in ("pt", "program", "onnx")]
    if unknown:
        raise ValueError(f"--format: unknown formats {unknown}; choose from pt, program, onnx")
    plain = export.to_plain(model, config).cpu().eval()
    example = torch.randn(1, *exp.input_size)
    stem = exp.path("exported", label)
    for fmt in formats:
        if fmt == "pt":
            print(export.save(plain, f"{stem}.pt"))
        elif fmt == "program":
            print(export.save_program(export.export_program(plain, example), f"{stem}.pt2"))
        else:
            try:
                print(export.export_onnx(plain, example, f"{stem}.onnx"))
            except RuntimeError as err:
                raise ValueError(str(err)) from err


def cmd_spec(args):
    from gross import spec

    exp = _experiment(args, check=False)
    d = exp.settings.decompose
    if d.spec == "auto":  # listed even when it finds nothing: the listing says why
        layers, left = spec.auto_spec(exp.architecture, exp.input_size, d.auto)
    else:
        layers, left = exp.check(), {}
    auto = ", ".join(f"{k}: {json.dumps(v)}" for k, v in exp.settings.to_dict()["decompose"]["auto"].items())
    header = [f"gross spec: {exp.name} at input {'×'.join(map(str, exp.input_size))}, {exp.num_classes} classes "
              f"(config {args.config})",
              f"decompose.spec: {d.spec if isinstance(d.spec, str) else 'a mapping'}" +
              (f"; decompose.auto: {auto}" if d.spec == "auto" else ""),
              "edit and pass back: --set decompose.spec=FILE"]
    print(spec.listing(exp.architecture, layers, left, exp.input_size, header), end="")


def cmd_reproduce(args):
    from gross.reproduce import reproduce

    exp = _experiment(args)
    print(reproduce(exp))
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
    "profile": (cmd_profile, "measure each series layer's latency at each group size on this device (latency.json)"),
    "search": (cmd_search, "rank configurations of the trained search space under a MACs and/or latency budget"),
    "finetune": (cmd_finetune, "decompose at one configuration alone and fine-tune it"),
    "evaluate": (cmd_evaluate, "validation and test accuracy (and MACs) of a model file"),
    "export": (cmd_export, "export one configuration as plain PyTorch (.pt), torch.export (.pt2) or ONNX"),
    "spec": (cmd_spec, "print the decomposition spec the config gives (with MAC shares) as editable YAML"),
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
        p.add_argument("--verbose", action="store_true",
                       help="at the end, print what the kernels' `auto` ran per layer call signature and why")
        if name in ("search", "evaluate", "export", "profile"):
            p.add_argument("--checkpoint", help="model file (default: the stage's file under --out"
                                                + ("; profile: the architecture with random factors)" if name == "profile"
                                                   else ")"))
        if name in ("finetune", "evaluate", "export"):
            p.add_argument("--group-config", help="N (every layer at N), original, largest, smallest, "
                                                  "or a YAML mapping layer: group size (inline or a file)")
        if name == "search":
            p.add_argument("--budget", type=float, help="MACs budget")
            p.add_argument("--budget-config", help="budget = the MACs of this configuration (e.g. 4)")
            p.add_argument("--latency-ms", type=float, help="latency budget in ms, predicted by the `gross profile` "
                                                            "table (config: search.latency_ms)")
            p.add_argument("--latency-of", help="latency budget = the predicted latency of this configuration, "
                                                "e.g. 4 (config: search.latency_of)")
            p.add_argument("--top", type=int, default=10, help="rows of the ranking to print")
        if name == "finetune":
            p.add_argument("--runs", type=int, default=1, help="fine-tuning runs (seeds seed, seed+1, …)")
        if name == "export":
            p.add_argument("--format", default="pt", help="comma-separated: pt, program, onnx")
    return parser


def main(argv=None):
    """Entry point of the `gross` console script; returns the exit status."""
    from gross.train import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.out is None:
        args.out = "gross-demo"
    try:
        args.fn(args)
        if args.verbose:
            import gross_kernels

            gross_kernels.dispatch_report()
    except KeyboardInterrupt:
        print("gross: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except NonFiniteError as err:  # the run failed, not the command line
        if args.traceback:
            raise
        print(f"gross {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        if args.traceback:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gross {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
