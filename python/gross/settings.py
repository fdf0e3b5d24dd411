"""Experiment configs: one typed dataclass per section (defaults here, once), YAML loading and `--set` overrides.

A section is a frozen dataclass whose `__post_init__` checks its values; `from_dict` builds the
whole `ExperimentSettings` from a YAML mapping, naming unknown and missing keys. To add a setting,
add a field (with its default and check) to its section; to add a section, add a dataclass and
a field of that type to `ExperimentSettings`.
"""
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import yaml

DATASETS = ("embedded", "cifar10", "cifar100", "imagenet", "imagefolder")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training schedule: SGD + MultiStepLR, plus what is trained and how configurations are drawn."""

    epochs: int
    lr: float
    milestones: tuple = ()
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    amp: bool = True            # mixed precision (float16 autocast + GradScaler); used on CUDA only
    runs: int = 1               # from scratch: independent runs, the median-accuracy one is kept
    sample: bool = False        # search-space training: a random group size per series layer per step
    series_only: bool = False   # train only the series factors (A_i, B_i, C_i); all else incl. biases frozen
    freeze_bn: bool = False     # batch norm in eval mode (running statistics fixed) while training

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        for key in ("lr", "gamma", "momentum", "weight_decay"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (key == "lr" and value == 0)):
                raise ValueError(f"{key} must be a {'positive' if key == 'lr' else 'non-negative'} number, "
                                 f"got {value!r}")
        for key in ("amp", "sample", "series_only", "freeze_bn"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        milestones = tuple(self.milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise ValueError(f"milestones must be increasing positive ints, got {self.milestones!r}")
        object.__setattr__(self, "milestones", milestones)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ValueError(f"runs must be a positive int, got {self.runs!r}")

    def to_dict(self):
        """JSON-able form (milestones as a list)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))



CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _fail(key, rule, value):
    raise ValueError(f"{key} must be {rule}, got {value!r}")


def _int(key, value, minimum=None, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        rule = "an int" if minimum is None else ("a positive int" if minimum == 1 else f"an int >= {minimum}")
        _fail(key, rule + (" or null" if optional else ""), value)
    return value


def _number(key, value, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        _fail(key, "a positive number" if positive else "a number", value)
    return float(value)


def _choice(key, value, choices):
    if value not in choices:
        _fail(key, f"one of {list(choices)}", value)
    return value


def _bool(key, value):
    if not isinstance(value, bool):
        _fail(key, "true or false", value)
    return value


def _str(key, value, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        _fail(key, "a string" + (" or null" if optional else ""), value)
    return os.fspath(value)


def _tuple(self, name, value):
    object.__setattr__(self, name, None if value is None else tuple(value))


def _strings(key, value):
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _fail(key, "a list of strings", value)
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The `data` section: which dataset, its input size and normalisation, the search split, loaders."""

    name: str = "embedded"             # embedded | cifar10 | cifar100 | imagenet | imagefolder
    root: str = None                   # dataset folder (all but embedded)
    input_size: tuple = None           # (C, H, W) the network sees; null: the dataset's own (32 or 224)
    mean: tuple = None                 # per-channel normalisation; null: the dataset's statistics
    std: tuple = None
    augment: bool = True               # random crops and flips on the training split
    search_per_class: int = None       # held-out training images per class for the search (see gross.data)
    split_seed: int = 0                # seeds which training images are held out
    eval_batch_size: int = None        # null: the recipe's batch size
    workers: int = 0                   # DataLoader worker processes
    limit: int = None                  # smoke runs: only the first N samples of each split

    def __post_init__(self):
        _choice("name", self.name, DATASETS)
        _str("root", self.root, optional=True)
        if self.input_size is not None:
            size = self.input_size
            if (not isinstance(size, (list, tuple)) or len(size) != 3 or size[0] not in (1, 3)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)):
                _fail("input_size", "[C, H, W] with C 1 or 3 and positive H, W", size)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                _fail(key, "a list of numbers (one per channel) or null", value)
        if self.std is not None and not all(v > 0 for v in self.std):
            _fail("std", "positive", self.std)
        _bool("augment", self.augment)
        _int("search_per_class", self.search_per_class, 1, optional=True)
        _int("split_seed", self.split_seed, 0)
        _int("eval_batch_size", self.eval_batch_size, 1, optional=True)
        _int("workers", self.workers, 0)
        _int("limit", self.limit, 1, optional=True)
        for key in ("input_size", "mean", "std"):
            _tuple(self, key, getattr(self, key))


@dataclasses.dataclass(frozen=True)
class AutoSpecSettings:
    """`decompose.auto`: how `spec: auto` picks layers, bottlenecks and group sizes (see gross.spec)."""

    max_group_size: int = 32           # the chain's largest group size
    group_sizes: tuple = None          # the chain to draw from; null: powers of two up to max_group_size
    bottleneck: float = 1.0            # S = T = this ratio of C_in (at most C_in and C_out)
    min_channels: int = 16             # fewer input or output channels: left alone
    include: tuple = ("*",)            # fnmatch patterns of module names to consider
    exclude: tuple = ()                # … and to leave alone

    def __post_init__(self):
        _int("max_group_size", self.max_group_size, 1)
        if self.group_sizes is not None:
            sizes = self.group_sizes
            if (not isinstance(sizes, (list, tuple)) or not sizes
                    or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in sizes)):
                _fail("group_sizes", "a list of positive ints or null", sizes)
            if list(sizes) != sorted(set(sizes)) or any(b % a for a, b in zip(sizes, sizes[1:])):
                _fail("group_sizes", "a nested chain (increasing, each dividing the next)", sizes)
            object.__setattr__(self, "group_sizes", tuple(sizes))
        _number("bottleneck", self.bottleneck)
        if self.bottleneck > 1:
            _fail("bottleneck", "a ratio of C_in in (0, 1]", self.bottleneck)
        _int("min_channels", self.min_channels, 1)
        object.__setattr__(self, "include", _strings("include", self.include))
        object.__setattr__(self, "exclude", _strings("exclude", self.exclude))


@dataclasses.dataclass(frozen=True)
class DecomposeSettings:
    """The `decompose` section: the spec and how the BTDs are fitted (gross.convert's arguments)."""

    spec: object = "auto"              # auto | default | high_compression | a mapping | a YAML file of one
    auto: AutoSpecSettings = dataclasses.field(default_factory=AutoSpecSettings)
    init: str = "decompose"            # decompose (BTD of the trained weights) | random
    tol: float = 1e-5
    max_iter: int = 500
    method: str = "pci"
    workers: int = 1                   # CPU processes running the BTDs

    def __post_init__(self):
        if not isinstance(self.spec, (str, Mapping)):
            _fail("spec", "auto, default, high_compression, a mapping layer → {group_sizes, bottleneck} "
                          "or a YAML file of one", self.spec)
        _choice("init", self.init, ("decompose", "random"))
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol >= 0:
            _fail("tol", "a number >= 0", self.tol)
        _int("max_iter", self.max_iter, 1)
        _choice("method", self.method, ("pci", "als"))
        _int("workers", self.workers, 1)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The `search` section: strategy and its knobs (gross.search.exhaustive / bfs)."""

    strategy: str = "exhaustive"       # exhaustive | bfs
    beam: int = 8                      # bfs: configurations kept per level
    configs_per_pass: int = 16         # configurations sharing each pass over the search split
    latency_ms: float = None           # latency budget in ms, predicted by the `gross profile` table
    latency_of: object = None          # … or the predicted latency of this configuration (N, 'original', a mapping)

    def __post_init__(self):
        _choice("strategy", self.strategy, ("exhaustive", "bfs"))
        _int("beam", self.beam, 1)
        _int("configs_per_pass", self.configs_per_pass, 1)
        if self.latency_ms is not None:
            _number("latency_ms", self.latency_ms)
        if self.latency_ms is not None and self.latency_of is not None:
            raise ValueError("give either latency_ms (a budget in ms) or latency_of (a configuration whose "
                             "latency is the budget), not both")


@dataclasses.dataclass(frozen=True)
class LatencySettings:
    """The `latency` section: how `gross profile` measures the latency table and where it goes (gross.latency)."""

    table: str = None                  # the table's file; null: latency.json in the output folder
    device: str = None                 # the device to time; null: the experiment's
    batch_size: int = 1
    dtype: str = "float32"             # float32 | float64 | float16 | bfloat16
    backward: bool = False             # time forward + backward (training) instead of inference
    repeats: int = 20                  # round-robin rounds whose medians are kept
    warmup: int = 3                    # rounds run first and dropped
    checks: int = 20                   # random whole-model configurations checking the prediction
    timer: str = "wall"                # wall | cpu (one CPU thread's time: for shared machines)

    def __post_init__(self):
        _str("table", self.table, optional=True)
        _str("device", self.device, optional=True)
        _int("batch_size", self.batch_size, 1)
        _choice("dtype", self.dtype, ("float32", "float64", "float16", "bfloat16"))
        _bool("backward", self.backward)
        _int("repeats", self.repeats, 1)
        _int("warmup", self.warmup, 0)
        _int("checks", self.checks, 0)
        _choice("timer", self.timer, ("wall", "cpu"))


@dataclasses.dataclass(frozen=True)
class ReproduceSettings:
    """The `reproduce` section: the budgets of the headline table and fine-tuning runs per configuration."""

    budgets: tuple = (4, 16)           # uniform group size N, 'original', 'largest', 'smallest' or a mapping
    runs: int = 3                      # fine-tuning runs per configuration (mean ± std)

    def __post_init__(self):
        if not isinstance(self.budgets, (list, tuple)) or not self.budgets:
            _fail("budgets", "a non-empty list", self.budgets)
        object.__setattr__(self, "budgets", tuple(self.budgets))
        _int("runs", self.runs, 1)


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """A whole experiment config: the network, where results go, and one field per section."""

    model: str                         # a paper name, torchvision:NAME, timm:NAME or python:module:factory
    out: str                           # output folder
    train: Recipe                      # from scratch
    search_space: Recipe               # a random configuration per step
    finetune: Recipe                   # one configuration
    model_kwargs: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the model's builder
    weights: str = None                # a trained weights file or torchvision weights name: skips `train`
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    decompose: DecomposeSettings = dataclasses.field(default_factory=DecomposeSettings)
    search: SearchSettings = dataclasses.field(default_factory=SearchSettings)
    latency: LatencySettings = dataclasses.field(default_factory=LatencySettings)
    reproduce: ReproduceSettings = dataclasses.field(default_factory=ReproduceSettings)

    def __post_init__(self):
        _str("model", self.model)
        _str("out", self.out)
        if not isinstance(self.model_kwargs, Mapping):
            _fail("model_kwargs", "a mapping of keyword arguments", self.model_kwargs)
        try:
            json.dumps(self.model_kwargs)
        except TypeError:
            _fail("model_kwargs", "JSON-able (numbers, strings, lists, mappings)", self.model_kwargs)
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        _str("weights", self.weights, optional=True)
        _int("seed", self.seed)
        _str("device", self.device)

    def to_dict(self):
        """The settings as plain JSON-able data (every default filled in)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _section_type(cls, name):
    """The dataclass type of field `name` of `cls`, or None when it is a plain value."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.type if dataclasses.is_dataclass(field.type) else None


def _required(field):
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _problems(cls, raw, prefix):
    """(unknown keys, missing keys) of mapping `raw` against dataclass `cls`, recursively."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [f"{prefix}{k}" for k in raw if k not in fields]
    missing = [f"{prefix}{name}" for name, f in fields.items() if _required(f) and name not in raw]
    for name, value in raw.items():
        section = _section_type(cls, name) if name in fields else None
        if section is not None:
            value = {} if value is None else value
            if not isinstance(value, Mapping):
                raise ValueError(f"{prefix}{name} must be a mapping, got {value!r}")
            more_unknown, more_missing = _problems(section, value, f"{prefix}{name}.")
            unknown += more_unknown
            missing += more_missing
    return unknown, missing


def _build(cls, raw, prefix):
    values = {}
    for name, value in raw.items():
        section = _section_type(cls, name)
        values[name] = _build(section, value or {}, f"{prefix}{name}.") if section is not None else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix}{err}" if prefix else str(err)) from err


def from_dict(raw, origin="the config"):
    """`ExperimentSettings` from a YAML mapping; ValueError naming unknown keys, missing keys or a bad value."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{origin}: an experiment config must be a YAML mapping")
    unknown, missing = _problems(ExperimentSettings, raw, "")
    if missing:
        raise ValueError(f"{origin}: missing keys {sorted(missing)}")
    if unknown:
        raise ValueError(f"{origin}: unknown keys {unknown}")
    return _build(ExperimentSettings, raw, "")


# --------------------------------------------------------------------------------------------
# YAML files and command-line overrides

class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: PyYAML (YAML 1.1) reads `1e-3`, without a dot, as a string."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def yaml_load(stream, what=None):
    """Parse YAML text or a file object (safe types only; `1e-3` is a float); given `what`, a
    syntax error becomes one ValueError line that names it."""
    try:
        return yaml.load(stream, Loader=_Loader)
    except yaml.YAMLError as err:
        if what is None:
            raise
        raise ValueError(f"{what}: not valid YAML ({str(err).splitlines()[0]})") from err


def shipped_configs():
    """Names of the experiment configs shipped in gross/configs."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def config_path(name):
    """The file of config `name`: a path, or the name of a shipped config."""
    if os.path.isfile(name):
        return name
    shipped = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.isfile(shipped):
        return shipped
    raise ValueError(f"config {name!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def _with_sections(raw, cls=ExperimentSettings):
    """`raw` with an empty mapping for every absent section or mapping field, so `--set` can reach into it."""
    for field in dataclasses.fields(cls):
        section = _section_type(cls, field.name)
        if section is not None and not _required(field):
            raw[field.name] = _with_sections(dict(raw.get(field.name) or {}), section)
        elif field.default_factory is dict:
            raw.setdefault(field.name, {})
    return raw


def apply_override(cfg, text):
    """Apply one `key.sub=value` override in place; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected key.sub=value")
    try:
        value = yaml_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {text!r}: the value is not valid YAML ({err.__class__.__name__})") from err
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise ValueError(f"--set {text!r}: {'.'.join(parents[:i + 1])} is not a section of the config")
        node = node[part]
    node[leaf] = value


def load_config(name, overrides=(), device=None, data_root=None, out=None):
    """An experiment config (a file or a shipped name) as a checked mapping, with `--set` overrides and options applied."""
    path = config_path(name)
    with open(path) as f:
        cfg = yaml_load(f, path)
    from_dict(cfg, path)
    cfg = _with_sections(dict(cfg))
    for text in overrides:
        apply_override(cfg, text)
    for key, value in (("device", device), ("out", out)):
        if value is not None:
            cfg[key] = value
    if data_root is not None:
        cfg["data"]["root"] = data_root
    from_dict(cfg, f"{path} with --set overrides")
    return cfg
