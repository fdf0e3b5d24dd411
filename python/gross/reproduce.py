"""The paper's headline experiment as resumable stages: train, decompose, train the space, search, fine-tune, report."""
import copy
import csv
import json
import os
import statistics
import time

import torch

from gross import checkpoint, data, export, models, search, train
from gross.config import set_config, uniform_config

SECTIONS = ("train", "search_space", "finetune")


def write_json(path, obj):
    """Write JSON to `path` atomically (temp file + rename), so a crash leaves the old file or none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path, text):
    """Write text to `path` atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def resolve_device(name):
    """'auto' → this process's GPU if any, else the CPU; otherwise the named device, which must exist."""
    if name in (None, "auto"):
        from gross.distributed import default_device
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------------------------
# Model files: weights plus what is needed to rebuild the architecture (name, classes, spec)

def save_model(path, model, meta):
    """Save `model`'s weights atomically with `meta` (model name, num_classes, spec, metrics, config)."""
    checkpoint.save_weights(path, model, meta)


def read_meta(path):
    """The meta dict stored by `save_model`, without loading the weights."""
    signature = checkpoint.read_header(path).get("signature") or {}
    meta = signature.get("meta")
    if not isinstance(meta, dict) or "model" not in meta:
        raise checkpoint.CheckpointError(f"{path!r} is not a gross model file (no model meta); "
                                         f"it was not written by save_model")
    return meta


def load_model(path):
    """Rebuild the model a `save_model` file describes and load its weights; returns (model, meta)."""
    from gross.decompose import convert

    meta = read_meta(path)
    model = models.build(meta["model"], num_classes=meta["num_classes"])
    if meta.get("spec"):
        model = convert(model, meta["spec"], init="random", progress=False)
    checkpoint.load_weights(path, model)
    if meta.get("config"):
        set_config(model, meta["config"])
    return model, meta


# --------------------------------------------------------------------------------------------
# Configurations named in experiment files

def resolve_spec(name, spec):
    """The decomposition spec: 'default', 'high_compression' or a mapping (layer names may be human names)."""
    if spec == "default":
        return models.default_spec(name)
    if spec == "high_compression":
        return models.high_compression_spec()
    if isinstance(spec, dict) and spec:
        return {models.module_name(name, layer): dict(entry) for layer, entry in spec.items()}
    raise ValueError(f"decompose.spec must be 'default', 'high_compression' or a mapping layer → "
                     f"{{group_sizes, bottleneck}}, got {spec!r}")


def resolve_config(name, model, entry):
    """(label, config) for a budget entry: int N (every layer at N), 'original', 'largest', 'smallest' or a mapping."""
    from gross.config import extreme_config, validate_config

    if isinstance(entry, bool):
        raise ValueError(f"a configuration must be a group size, a name or a mapping, got {entry!r}")
    if isinstance(entry, int):
        return str(entry), uniform_config(model, entry)
    if entry == "original":
        return "original", models.high_compression_config()
    if entry in ("largest", "smallest"):
        return entry, extreme_config(model, entry == "largest")
    if isinstance(entry, dict):
        config = {models.module_name(name, layer): g for layer, g in entry.items()}
        validate_config(model, config, complete=True)
        return "custom", config
    raise ValueError(f"a configuration must be an int group size, 'original', 'largest', 'smallest' "
                     f"or a mapping layer → group size, got {entry!r}")


def config_string(config):
    """Compact form of a configuration: group sizes in layer order, e.g. '4-8-16'."""
    return "-".join(str(g) for g in config.values())


# --------------------------------------------------------------------------------------------

class Experiment:
    """One network under one experiment config; every stage writes its result to `out` and is skipped when done."""

    def __init__(self, cfg, progress=True, log=print, chain=True):
        self.cfg = cfg
        self.chain = chain  # False: a missing earlier stage is an error instead of being run
        self.name = cfg["model"]
        if self.name not in models.NAMES:
            raise ValueError(f"model must be one of {list(models.NAMES)}, got {self.name!r}")
        self.out = cfg["out"]
        self.seed = int(cfg.get("seed", 0))
        self.device = resolve_device(cfg.get("device", "auto"))
        self.progress = progress
        self._log = log
        self._start = time.time()
        self.recipes = {s: self._recipe(s) for s in SECTIONS}
        self.spec = resolve_spec(self.name, cfg["decompose"]["spec"])
        self.input_size = tuple(cfg["data"]["input_size"])
        self._datasets = None
        self._base = None
        self._single = {}
        self._snapshotted = False

    def _snapshot(self):
        """Record the settings in out/experiment.json; warn when a rerun reuses stages made with others."""
        if self._snapshotted:
            return
        self._snapshotted = True
        path = self.path("experiment.json")
        if not os.path.exists(path):
            write_json(path, self.cfg)
            return
        with open(path) as f:
            first = json.load(f)
        changed = sorted(k for k in set(_flatten(first)) | set(_flatten(self.cfg))
                         if _flatten(first).get(k) != _flatten(self.cfg).get(k))
        if changed:
            self.log(f"warning: {self.out} was started with other settings ({', '.join(changed)}); "
                     f"finished stages are reused as they are")

    def log(self, message):
        """Report progress, prefixed with the seconds since the experiment started."""
        self._log(f"{time.time() - self._start:6.0f} s  {message}")

    def _recipe(self, section):
        try:
            return train.Recipe(**self.cfg[section])
        except TypeError as err:
            raise ValueError(f"section {section!r}: {err}") from err

    def path(self, *parts):
        """A path inside the output folder."""
        return os.path.join(self.out, *parts)

    def _meta(self, spec=None, **extra):
        return {"model": self.name, "num_classes": self.cfg.get("num_classes"), "spec": spec, **extra}

    # --- data
    def datasets(self):
        """(train, val, test) datasets, loaded once."""
        if self._datasets is None:
            d = self.cfg["data"]
            self._datasets = data.load(d["name"], d.get("root"))
            limit = d.get("limit")
            if limit is not None:
                # Smoke runs: the first `limit` samples of each split.
                if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                    raise ValueError(f"data.limit must be a positive int or null, got {limit!r}")
                self._datasets = tuple(torch.utils.data.Subset(ds, range(min(limit, len(ds))))
                                       for ds in self._datasets)
        return self._datasets

    def loaders(self, recipe, seed=None):
        """(train, val, test) loaders with the recipe's batch size; `seed` (default: the experiment's) orders train."""
        d = self.cfg["data"]
        return data.make_loaders(*self.datasets(), recipe.batch_size, eval_batch_size=d.get("eval_batch_size"),
                                 workers=d.get("workers", 0), seed=self.seed if seed is None else seed)

    def eval_loaders(self):
        """(val, test) loaders."""
        return self.loaders(self.recipes["finetune"])[1:]

    def accuracies(self, model):
        """{"val_acc", "test_acc"} of `model` at its active configuration."""
        val, test = self.eval_loaders()
        return {"val_acc": train.accuracy(model, val, self.device),
                "test_acc": train.accuracy(model, test, self.device)}

    # --- stages
    def base(self):
        """The trained network: loaded from `base.pt`, from `weights`, or trained from scratch."""
        self._snapshot()
        if self._base is not None:
            return self._base
        path = self.path("base.pt")
        if os.path.exists(path):
            self._base = load_model(path)[0].to(self.device)
            return self._base
        weights = self.cfg.get("weights")
        if not weights and not self.chain:
            raise ValueError(f"no trained network at {path!r}: run `gross train` first or set weights=FILE")
        if weights:
            self.log(f"[train] loading weights {weights}")
            model = models.build(self.name, num_classes=self.cfg.get("num_classes"), weights=weights)
        else:
            recipe = self.recipes["train"]
            self.log(f"[train] {self.name} from scratch: {recipe.runs} run(s) of {recipe.epochs} epochs")
            model, _ = train.train_from_scratch(self.name, self.loaders(recipe), recipe, out_dir=self.path("base"),
                                                seed=self.seed, device=self.device, resume=True,
                                                progress=self.progress, num_classes=self.cfg.get("num_classes"))
        model.to(self.device)
        metrics = self.accuracies(model)
        self.log(f"[train] val {metrics['val_acc']:.2%}  test {metrics['test_acc']:.2%}")
        save_model(path, model, self._meta(metrics=metrics))
        self._base = model
        return model

    def skeleton(self):
        """The series architecture with random factors: enough to name and check configurations."""
        from gross.decompose import convert

        return convert(models.build(self.name, num_classes=self.cfg.get("num_classes")), self.spec, init="random",
                       progress=False)

    def decompose(self, spec=None, init=None):
        """A copy of the trained network with the layers of `spec` (default: the experiment's) as series."""
        from gross.decompose import convert

        d = self.cfg["decompose"]
        return convert(self.base(), spec or self.spec, inplace=False, progress=self.progress,
                       init=init or d.get("init", "decompose"), tol=d.get("tol", 1e-5),
                       max_iter=d.get("max_iter", 500), method=d.get("method", "pci"),
                       workers=d.get("workers", 1)).to(self.device)

    def decomposed(self):
        """The series model straight after decomposition (`series_init.pt`)."""
        self._snapshot()
        path = self.path("series_init.pt")
        if os.path.exists(path):
            return load_model(path)[0].to(self.device)
        self.base()
        self.log(f"[decompose] {len(self.spec)} layers, init={self.cfg['decompose'].get('init', 'decompose')}")
        model = self.decompose()
        save_model(path, model, self._meta(self.spec))
        return model

    def search_space(self):
        """The series model after search-space training (`series.pt`)."""
        self._snapshot()
        path = self.path("series.pt")
        if os.path.exists(path):
            return load_model(path)[0].to(self.device)
        if not self.chain and not os.path.exists(self.path("series_init.pt")):
            raise ValueError(f"no decomposed model at {self.path('series_init.pt')!r}: run `gross decompose` first")
        model = self.decomposed()
        recipe = self.recipes["search_space"]
        self.log(f"[train-space] {recipe.epochs} epochs, lr {recipe.lr:g}")
        train_loader, val_loader, _ = self.loaders(recipe)
        train.train_search_space(model, train_loader, val_loader, recipe, out_dir=self.path("space"),
                                 device=self.device, resume=True, seed=self.seed, progress=self.progress)
        save_model(path, model, self._meta(self.spec))
        return model

    def search(self, model, budget_macs=None):
        """Search `model`'s configurations under `budget_macs` with the configured strategy (results resumable)."""
        self._snapshot()
        s = self.cfg["search"]
        val_loader = self.eval_loaders()[0]
        common = dict(device=self.device, results=self.path("search.jsonl"),
                      configs_per_pass=s.get("configs_per_pass", 16), progress=self.progress)
        if s.get("strategy", "exhaustive") == "exhaustive":
            return search.exhaustive(model, val_loader, self.input_size, budget_macs, **common)
        if s["strategy"] == "bfs":
            return search.bfs(model, val_loader, self.input_size, budget_macs, beam=s.get("beam", 8), **common)
        raise ValueError(f"search.strategy must be 'exhaustive' or 'bfs', got {s['strategy']!r}")

    def finetune(self, config, run):
        """Decompose the trained network at `config` alone, fine-tune it, score it and export it (cached per run).

        Run r uses seed + r; run 0's model is exported as plain PyTorch to exported/<config>.pt.
        """
        self._snapshot()
        tag = f"{config_string(config)}-run{run}"
        path = self.path("finetune", f"{tag}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        key = config_string(config)
        if key not in self._single:  # the decomposition is deterministic: one per configuration
            single = {name: {"group_sizes": [g], "bottleneck": self.spec[name].get("bottleneck")}
                      for name, g in config.items()}
            self._single = {key: self.decompose(single)}  # keep one: runs of a configuration are adjacent
        model = copy.deepcopy(self._single[key])
        recipe = self.recipes["finetune"]
        self.log(f"[finetune] {config_string(config)} run {run + 1}: {recipe.epochs} epochs")
        # Runs differ in their seed, hence in the order of the training data too.
        train_loader, val_loader, _ = self.loaders(recipe, seed=self.seed + run)
        train.finetune(model, config, train_loader, val_loader, recipe, out_dir=self.path("finetune", tag),
                       device=self.device, resume=True, seed=self.seed + run, progress=self.progress)
        result = {"config": config, "run": run, "macs": search.MacsTable(model, self.input_size)(config),
                  **self.accuracies(model)}
        if run == 0:
            result["exported"] = os.path.join("exported", f"{config_string(config)}.pt")
            export.save(export.to_plain(model, config).cpu().eval(), self.path(result["exported"]))
        write_json(path, result)
        return result

    def reproduce(self):
        """Every stage, then the report (table.md, results.csv, results.json, pareto.png); returns the table."""
        self._snapshot()
        model = self.search_space()
        macs = search.MacsTable(model, self.input_size)
        rep = self.cfg["reproduce"]
        budgets = [resolve_config(self.name, model, b) for b in rep["budgets"]]
        runs = int(rep.get("runs", 1))
        self.log(f"[search] {self.cfg['search'].get('strategy', 'exhaustive')} over {search.space_size(model):,} "
                 f"configurations, budgets {[label for label, _ in budgets]}")
        if self.cfg["search"].get("strategy", "exhaustive") == "exhaustive":
            evaluated = self.search(model).evaluated  # one pass over the whole space serves every budget
            searched = {label: search.rank([e for e in evaluated if e.macs <= macs(c)]) for label, c in budgets}
        else:
            found = {label: self.search(model, macs(c)) for label, c in budgets}
            searched = {label: r.ranked for label, r in found.items()}
            evaluated = list({search.config_key(e.config): e for r in found.values() for e in r.evaluated}.values())
        val_of = {search.config_key(e.config): e.accuracy for e in evaluated}
        # A budget's own configuration may not have been visited (bfs): score it for the table.
        missing = [c for _, c in budgets if search.config_key(c) not in val_of]
        if missing:
            for c, acc in zip(missing, search.evaluate(model, missing, self.eval_loaders()[0], self.device)):
                val_of[search.config_key(c)] = acc
        self.log(f"[search] {len(evaluated):,} configurations evaluated")
        rows = []
        for label, uniform in budgets:
            best = searched[label][0].config
            for method, config in (("uniform", uniform), ("searched", best)):
                results = [self.finetune(config, r) for r in range(runs)]
                accs = [r["test_acc"] for r in results]
                rows.append({"budget": label, "method": method, "config": config, "macs": macs(config),
                             "search_val_acc": val_of[search.config_key(config)],
                             "test_acc_mean": statistics.fmean(accs),
                             "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "test_accs": accs, "exported": results[0]["exported"]})
        return self.report(rows, evaluated)

    def report(self, rows, evaluated):
        """Write table.md, results.csv, results.json and pareto.png; returns the markdown table."""
        from gross.plots import pareto_plot

        table = markdown_table(rows, list(self.spec), self.recipes["finetune"].epochs)
        write_text(self.path("table.md"), table + "\n")
        write_json(self.path("results.json"), {"model": self.name, "rows": rows,
                                               "searched": [e.to_json() for e in evaluated]})
        with open(self.path("results.csv.tmp"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["budget", "method", "configuration", "macs", "search_val_acc", "test_acc_mean",
                             "test_acc_std", "runs", "exported"])
            for r in rows:
                writer.writerow([r["budget"], r["method"], config_string(r["config"]), r["macs"],
                                 f"{r['search_val_acc']:.6f}", f"{r['test_acc_mean']:.6f}",
                                 f"{r['test_acc_std']:.6f}", len(r["test_accs"]), r["exported"]])
        os.replace(self.path("results.csv.tmp"), self.path("results.csv"))
        pareto_plot(self.path("pareto.png"), evaluated, rows, title=f"GroSS search: {self.name}")
        return table


def _flatten(cfg, prefix=""):
    """{'a.b': value} for a nested dict."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v and k != "spec":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def markdown_table(rows, layers, epochs):
    """The headline table: per budget, uniform vs searched configuration, MACs and accuracies."""
    lines = ["| budget | method | configuration | MACs | search-space val acc | fine-tuned test acc |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        n = len(r["test_accs"])
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} % (n={n})"
        lines.append(f"| {r['budget']} | {r['method']} | {config_string(r['config'])} | {r['macs'] / 1e6:.3f} M | "
                     f"{100 * r['search_val_acc']:.2f} % | {acc} |")
    lines.append("")
    lines.append(f"Configuration: group size per layer, in order {', '.join(layers)}. Fine-tuned {epochs} epochs "
                 f"from the decomposition of the trained network at that configuration alone; "
                 f"run 1 of each is exported as plain PyTorch to exported/<configuration>.pt.")
    return "\n".join(lines)
