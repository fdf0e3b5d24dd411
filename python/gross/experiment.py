"""One experiment at run time: settings, output folder, device, data splits, the network's source and spec.

Every stage (`gross.stages`) takes an `Experiment`. `check()` resolves everything a config can
get wrong (model source, weights, data, input size, spec) before any stage writes a file.
"""
import functools
import json
import os
import time

import torch

from gross_kernels.files import atomic_write_json

from gross import checkpoint, data, models, settings, spec, train
from gross.config import extreme_config, uniform_config, validate_config


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


def _flatten(cfg, prefix=""):
    """{'a.b': value} for a nested dict (a spec mapping stays one value)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v and k not in ("spec", "model_kwargs"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Experiment:
    """One network under one experiment config (a mapping or `settings.ExperimentSettings`).

    `chain=False`: a stage whose input is missing is an error instead of being run first.
    `memo` keeps models between the stages of one process.
    """

    def __init__(self, cfg, progress=True, log=print, chain=True):
        self.settings = cfg if isinstance(cfg, settings.ExperimentSettings) else settings.from_dict(cfg)
        s = self.settings
        models.parse_source(s.model, key="model")
        self.name, self.out, self.seed = s.model, s.out, s.seed
        self.device = resolve_device(s.device)
        self.recipes = {"train": s.train, "search_space": s.search_space, "finetune": s.finetune}
        self.progress, self.chain, self._log = progress, chain, log
        self.memo = {}
        self._start = time.time()
        self._snapshotted = False

    # --- what the config names, resolved and checked once
    @functools.cached_property
    def input_size(self):
        """One input's (C, H, W)."""
        return data.input_size_of(self.settings.data.name, self.settings.data.input_size)

    @functools.cached_property
    def num_classes(self):
        """The class count, from the data."""
        return data.num_classes(self.settings.data.name, self.settings.data.root)

    @functools.cached_property
    def splits(self):
        """The data's train / search / report splits (`gross.data.Splits`)."""
        return data.splits(self.settings.data)

    def build(self, weights=None):
        """The network, untrained or with `weights`, sized for the data's classes."""
        return models.build(self.name, num_classes=self.num_classes, weights=weights, kwargs=self.settings.model_kwargs)

    @functools.cached_property
    def architecture(self):
        """The untrained network, checked to run on the input size and to output the data's classes."""
        model = self.build()
        models.check_input(model, self.name, self.input_size, self.num_classes)
        return model

    @functools.cached_property
    def _spec(self):
        d = self.settings.decompose
        return spec.resolve(d.spec, self.name, self.architecture, self.input_size, d.auto)

    @property
    def spec(self):
        """The decomposition spec (module name → {group_sizes, bottleneck})."""
        return self._spec[0]

    def skeleton(self):
        """The series architecture with random factors: enough to name and check configurations."""
        return spec.skeleton(self.architecture, self.spec)

    def check(self):
        """Resolve and check the model source, weights, data, input size and spec; returns the spec.

        Raises ValueError (FileNotFoundError for missing data) naming the key and the rule. The
        data splits are built here too, so that a bad split is refused before anything is written.
        """
        models.check_weights(self.name, self.settings.weights)
        spec = self.spec
        _ = self.splits  # built now, so that a bad split is refused before any stage writes
        return spec

    # --- files
    def path(self, *parts):
        """A path inside the output folder."""
        return os.path.join(self.out, *parts)

    def record(self, spec=None, config=None, metrics=None):
        """The `checkpoint.ModelRecord` of this experiment's network with `spec` (None: not decomposed)."""
        return checkpoint.ModelRecord(model=self.name, num_classes=self.num_classes, kwargs=self.settings.model_kwargs,
                                      spec=spec, config=config, metrics=metrics)

    def load(self, path):
        """A model file's model, on the experiment's device."""
        return models.load(path)[0].to(self.device)

    def snapshot(self):
        """Record the settings in out/experiment.json; warn when a rerun reuses stages made with others."""
        if self._snapshotted:
            return
        self._snapshotted = True
        path, current = self.path("experiment.json"), self.settings.to_dict()
        if not os.path.exists(path):
            atomic_write_json(path, current)
            return
        with open(path) as f:
            first = _flatten(json.load(f))
        now = _flatten(current)
        changed = sorted(k for k in set(first) | set(now) if first.get(k) != now.get(k))
        if changed:
            self.log(f"warning: {self.out} was started with other settings ({', '.join(changed)}); "
                     f"finished stages are reused as they are")

    def log(self, message):
        """Report progress, prefixed with the seconds since the experiment started."""
        self._log(f"{time.time() - self._start:6.0f} s  {message}")

    # --- data
    def loaders(self, recipe, seed=None):
        """(train, search, report) loaders with the recipe's batch size; `seed` (default: the experiment's) orders train."""
        d, s = self.settings.data, self.splits
        return data.make_loaders(s.train, s.search, s.report, recipe.batch_size, eval_batch_size=d.eval_batch_size,
                                 workers=d.workers, seed=self.seed if seed is None else seed)

    def eval_loaders(self):
        """(search, report) loaders."""
        return self.loaders(self.recipes["finetune"])[1:]

    def accuracies(self, model):
        """{"val_acc" (the search split), "test_acc" (the report split)} of `model` at its active configuration."""
        val, test = self.eval_loaders()
        return {"val_acc": train.accuracy(model, val, self.device), "test_acc": train.accuracy(model, test, self.device)}

    # --- configurations named in configs and on the command line
    def named_config(self, model, entry):
        """(label, config) for an entry: int N (every layer at N), 'original', 'largest', 'smallest' or a mapping."""
        if isinstance(entry, bool):
            raise ValueError(f"a configuration must be a group size, a name or a mapping, got {entry!r}")
        if isinstance(entry, int):
            return str(entry), uniform_config(model, entry)
        if entry == "original":
            return "original", models.high_compression_config()
        if entry in ("largest", "smallest"):
            return entry, extreme_config(model, entry == "largest")
        if isinstance(entry, dict):
            config = {models.module_name(self.name, layer): g for layer, g in entry.items()}
            validate_config(model, config, complete=True)
            return "custom", config
        raise ValueError(f"a configuration must be an int group size, 'original', 'largest', 'smallest' "
                         f"or a mapping layer → group size, got {entry!r}")
