"""Latency tables: each series layer's measured time at each group size on this device, a search budget beside MACs."""
import gc
import hashlib
import json
import os
import platform
import statistics
import time

import torch
from tqdm.auto import tqdm

from gross.config import config_space, get_config, levels, series_layers, set_config
from gross.export import to_plain
from gross.macs import _check_input_size
from gross.search import AdditiveCost, config_key
from gross_kernels.backends import device_name
from gross_kernels.files import atomic_write_json

FORMAT = "gross-latency-table/1"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODES = {False: "inference", True: "forward+backward"}


# --------------------------------------------------------------------------------------------
# What a table was measured on: device, model, setting

def describe_device(device):
    """What identifies `device` for latency: its type and name, and for the CPU the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
        return {"type": "cuda", "name": device_name(device)}
    if device.type == "cpu":
        return {"type": "cpu", "name": device_name(device), "threads": torch.get_num_threads()}
    raise ValueError(f"device must be 'cpu' or 'cuda[:N]' (timed with CUDA events), got {str(device)!r}")


def _versions():
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        out["gross_kernels"] = metadata.version("gross-kernels")
    except metadata.PackageNotFoundError:
        pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def model_signature(model):
    """What a table must match in a model: its series layers' geometry and group sizes, and a digest of the rest."""
    layers = series_layers(model)
    inside = {id(m) for layer in layers.values() for m in layer.modules()}
    series = {name: {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                     "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                     "padding": list(layer.padding), "dilation": list(layer.dilation),
                     "bottleneck": list(layer.bottleneck), "bias": layer.bias is not None,
                     "group_sizes": list(layer.group_sizes)}
              for name, layer in layers.items()}
    # Every other module by name, class and settings (shapes included): the network around the layers.
    rest = "\n".join(f"{name}:{type(m).__qualname__}({m.extra_repr()})"
                     for name, m in model.named_modules() if id(m) not in inside)
    return {"class": type(model).__qualname__, "series": series,
            "rest_digest": hashlib.sha256(rest.encode()).hexdigest()[:16]}


def _signature_differences(table, model):
    if set(table["series"]) != set(model["series"]):
        only_table = sorted(set(table["series"]) - set(model["series"]))
        only_model = sorted(set(model["series"]) - set(table["series"]))
        return [f"series layers differ (only in the table: {only_table}, only in the model: {only_model})"]
    out = []
    for name, measured in table["series"].items():
        for key, value in measured.items():
            if model["series"][name].get(key) != value:
                out.append(f"layer {name}: {key} {value} in the table, {model['series'][name].get(key)} in the model")
    if (table["class"], table["rest_digest"]) != (model["class"], model["rest_digest"]):
        out.append(f"the rest of the network differs (table: {table['class']} {table['rest_digest']}, "
                   f"model: {model['class']} {model['rest_digest']})")
    return out


def _dtype_name(dtype):
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    names = {v: k for k, v in _DTYPES.items()}
    if dtype in names:
        return names[dtype]
    raise ValueError(f"dtype must be one of {list(_DTYPES)} (or the torch dtype), got {dtype!r}")


# --------------------------------------------------------------------------------------------
# The table

class LatencyTable(AdditiveCost):
    """Predicted latency in ms of any configuration: the rest of the network plus each layer at its size.

    Built by `profile`; `table(config)` is the prediction, `table.check(...)` refuses a use it was
    not measured for, `save` / `load` write and read its JSON file.
    """

    def __init__(self, per_layer, rest, *, device, input_size, batch_size, dtype, backward, model,
                 versions=None, prediction=None, settings=None, created=None, path=None):
        self.per_layer = {name: {int(g): float(ms) for g, ms in sizes.items()} for name, sizes in per_layer.items()}
        self.rest = float(rest)
        self.device, self.model = dict(device), model
        self.input_size, self.batch_size = list(input_size), int(batch_size)
        self.dtype, self.backward = _dtype_name(dtype), bool(backward)
        self.versions, self.prediction, self.settings = versions or {}, prediction, settings or {}
        self.created, self.path = created, path

    def to_json(self):
        """Plain dict for the JSON file."""
        return {"format": FORMAT, "created": self.created, "device": self.device, "versions": self.versions,
                "batch_size": self.batch_size, "dtype": self.dtype, "mode": _MODES[self.backward],
                "input_size": self.input_size, "model": self.model, "settings": self.settings,
                "per_layer_ms": {name: {str(g): ms for g, ms in sizes.items()} for name, sizes in self.per_layer.items()},
                "rest_ms": self.rest, "prediction": self.prediction}

    @classmethod
    def from_json(cls, obj, path=None):
        """The table a `to_json` dict describes."""
        where = path or "latency table"
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{where}: not a gross latency table (format {FORMAT!r} expected)")
        try:
            return cls(obj["per_layer_ms"], obj["rest_ms"], device=obj["device"], input_size=obj["input_size"],
                       batch_size=obj["batch_size"], dtype=obj["dtype"],
                       backward={v: k for k, v in _MODES.items()}[obj["mode"]], model=obj["model"],
                       versions=obj.get("versions"), prediction=obj.get("prediction"),
                       settings=obj.get("settings"), created=obj.get("created"), path=path)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: malformed latency table ({err.__class__.__name__}: {err})") from err

    def save(self, path):
        """Write the table as JSON to `path` atomically; returns the path."""
        self.path = atomic_write_json(path, self.to_json())
        return self.path

    @classmethod
    def load(cls, path):
        """The table in the JSON file `path` (FileNotFoundError when there is none)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no latency table at {path!r}: measure one first with `gross profile` "
                                    f"(or gross.latency.profile)")
        try:
            with open(path) as f:
                obj = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a gross latency table (invalid JSON: {err})") from err
        return cls.from_json(obj, path)

    def check(self, model=None, input_size=None, device=None, batch_size=None, dtype=None, backward=None):
        """Raise ValueError naming everything that differs between the table's measurement and this use.

        Only what is given is compared: `model` (its series layers and the rest of the network),
        `input_size` (C, H, W), `device` (compared with this machine's device of that name),
        `batch_size`, `dtype`, `backward`.
        """
        diffs = []
        if model is not None:
            diffs += _signature_differences(self.model, model_signature(model))
        if input_size is not None and list(input_size) != self.input_size:
            diffs.append(f"input size {self.input_size} in the table, {list(input_size)} here")
        if device is not None:
            here = describe_device(device)
            diffs += [f"device {key} {self.device.get(key)!r} in the table, {here.get(key)!r} here"
                      for key in sorted(set(self.device) | set(here)) if self.device.get(key) != here.get(key)]
        for key, value in (("batch_size", batch_size), ("dtype", None if dtype is None else _dtype_name(dtype)),
                           ("backward", backward)):
            if value is not None and getattr(self, key) != value:
                diffs.append(f"{key} {getattr(self, key)!r} in the table, {value!r} here")
        if diffs:
            raise ValueError(f"latency table {self.path or ''} was measured for another setting: " + "; ".join(diffs)
                             + ". Measure one for this setting with `gross profile` (gross.latency.profile)")
        return self


def format_table(table):
    """Markdown summary of a table: per layer the ms at each group size, the rest, the prediction check."""
    lines = [f"latency table: {table.device['name']} ({table.device['type']}"
             + (f", {table.device['threads']} threads" if "threads" in table.device else "")
             + f"), batch {table.batch_size}, {table.dtype}, {_MODES[table.backward]}, input {table.input_size}",
             "", "| layer | ms at group size |", "|---|---|"]
    for name, sizes in table.per_layer.items():
        lines.append(f"| {name} | " + ", ".join(f"{g}: {ms:.4f}" for g, ms in sizes.items()) + " |")
    lines.append(f"| rest of the network | {table.rest:.4f} |")
    share = table.settings.get("cpu_share")
    if share is not None and share < 0.9 and table.settings.get("timer") == "wall":
        lines += ["", f"warning: the profile got {100 * share:.0f} % of its threads' CPU time: other load on the "
                      f"machine inflated these wall-clock times (profile on an idle machine, or with timer 'cpu')"]
    p = table.prediction
    if p and p["configs"]:
        lines += ["", f"prediction checked on {len(p['configs'])} random configurations (whole exported model "
                      f"timed): median |error| {p['median_abs_error_pct']:.2f} %, worst {p['worst_error_pct']:+.2f} %"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Measuring

_TIMERS = ("wall", "cpu")


class _Clock:
    """Times one call of a function: CUDA events (read once per round) on a GPU; on the CPU the wall
    clock, or with timer="cpu" the calling thread's CPU time (at one thread: the latency less the
    time other processes took the core, for shared machines)."""

    def __init__(self, device, timer):
        self.cuda = device.type == "cuda"
        self.device = device
        self.now = time.thread_time if timer == "cpu" else time.perf_counter

    def start_round(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sample(self, run):
        """A pending sample in ms: resolve it with `read` after the round."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            return start, end
        begin = self.now()
        run()
        return (self.now() - begin) * 1e3

    def read(self, pending):
        """The ms of each pending sample of the round just run."""
        if not self.cuda:
            return pending
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in pending]


def _measure(items, repeats, warmup, device, timer, progress):
    """{key: median ms per call} of items (key, prepare, run), over `repeats` round-robin rounds after `warmup`.

    Round-robin (every item once per round) spreads slow drifts of the machine over all items
    alike. A sample is one call, run after all the other items: a layer finds its weights as
    cold in the caches as it does inside the network (repeating a layer's call kept them hot and
    moved a third of the layers' time into the fitted rest; bench/RESULTS.md).
    """
    clock = _Clock(device, timer)
    samples = [[] for _ in items]
    enabled = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whichever item ran
    try:
        for r in tqdm(range(warmup + repeats), desc="profile rounds", leave=False, disable=not progress):
            clock.start_round()
            pending = []
            for _, prepare, run in items:
                prepare()
                pending.append(clock.sample(run))
            if r >= warmup:
                for i, ms in enumerate(clock.read(pending)):
                    samples[i].append(ms)
    finally:
        if enabled:
            gc.enable()
    return {key: statistics.median(s) for (key, _, _), s in zip(items, samples)}


def _runner(module, inputs, backward):
    """A call of `module` on each of its inputs, with a backward pass of a random gradient on request."""
    if not backward:
        return lambda: [module(x) for x in inputs]
    with torch.no_grad():
        grads = [torch.randn_like(module(x)) for x in inputs]

    def run():
        for x, g in zip(inputs, grads):
            module(x).backward(g)
    return run


def _input_shapes(plain, names, example):
    """Per series layer position of `plain`, the input shape of each call in one forward pass."""
    shapes = {name: [] for name in names}
    hooks = [plain.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: shapes[name].append(tuple(args[0].shape))) for name in names]
    try:
        with torch.no_grad():
            plain(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _random_configs(space, count, exclude, seed):
    """Up to `count` distinct uniformly random configurations of `space`, none of them in `exclude`."""
    generator = torch.Generator().manual_seed(seed)
    seen, out = {config_key(c) for c in exclude}, []
    for _ in range(100 * count):
        if len(out) == count:
            break
        config = {name: sizes[int(torch.randint(len(sizes), (), generator=generator))] for name, sizes in space.items()}
        if config_key(config) not in seen:
            seen.add(config_key(config))
            out.append(config)
    return out


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def profile(model, input_size, *, batch_size=1, dtype=torch.float32, device="cpu", backward=False, repeats=20,
            warmup=3, checks=20, timer="wall", seed=0, progress=False):
    """Measure the latency table of `model`'s series layers on `device`, and check its prediction.

    Each SeriesConv2d is timed at each of its group sizes in its exported form (three plain
    nn.Conv2d, as deployed) on random inputs of the shape it sees in the network for inputs of
    `input_size` (C, H, W) at `batch_size`: inference (`torch.inference_mode`) by default, a
    forward and backward pass (train mode) with `backward=True`, in `dtype`. The rest of the
    network is a fixed cost: the median, over the configurations with every layer at its j-th
    size, of the whole exported model's time less its layers' times. The additive prediction
    is then checked on `checks` other random configurations of the whole exported model; their
    errors (median and worst, in %) are stored in `table.prediction`. Every item is timed in
    `repeats` round-robin rounds after `warmup` ones (CUDA events on a GPU) and its median kept.
    On the CPU `timer="cpu"` times the thread's CPU time instead of the wall clock: at one thread
    (required) that is the latency without the time other processes took, for shared machines.
    The model itself is left as it was.
    """
    input_size = _check_input_size(input_size)
    _check_int("batch_size", batch_size)
    _check_int("repeats", repeats)
    _check_int("warmup", warmup, 0)
    _check_int("checks", checks, 0)
    if timer not in _TIMERS:
        raise ValueError(f"timer must be one of {list(_TIMERS)}, got {timer!r}")
    if timer == "cpu" and (torch.device(device).type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("timer='cpu' times one CPU thread: it needs device='cpu' and torch.set_num_threads(1) "
                         f"(OMP_NUM_THREADS=1); here device={str(device)!r}, {torch.get_num_threads()} threads")
    dtype_name = _dtype_name(dtype)
    dtype, device = _DTYPES[dtype_name], torch.device(device)
    described = describe_device(device)
    space = config_space(model)
    if not space:
        raise ValueError("the model has no SeriesConv2d layers: nothing to profile")
    previous = get_config(model)
    try:
        exported = {}
        for name, layer in series_layers(model).items():
            exported[name] = {}
            for g in layer.group_sizes:
                layer.group_size = g
                exported[name][g] = (layer.export().to(device=device, dtype=dtype).train(backward)
                                     .requires_grad_(backward))
        plain = to_plain(model).to(device=device, dtype=dtype).train(backward).requires_grad_(backward)
    finally:
        set_config(model, previous)

    def place(config):
        for name, g in config.items():
            plain.set_submodule(name, exported[name][g])

    example = torch.randn(batch_size, *input_size, device=device, dtype=dtype)
    shapes = _input_shapes(plain, list(space), example)
    references = levels(space)
    checked = _random_configs(space, checks, references, seed)

    # Items are keyed (layer, group size) or by the configuration of the whole model.
    items = []
    for name, sizes in exported.items():
        for g, module in sizes.items():
            inputs = [torch.randn(s, device=device, dtype=dtype).requires_grad_(backward) for s in shapes[name]]
            items.append(((name, g), lambda: None, _runner(module, inputs, backward)))
    whole = _runner(plain, [example], backward)
    items += [(config_key(c), lambda c=c: place(c), whole) for c in references + checked]
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(not backward):
        medians = _measure(items, repeats, warmup, device, timer, progress)
    # The share of its threads' time the process got: well below 1, other load inflated wall-clock times.
    share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * torch.get_num_threads())

    per_layer = {name: {g: medians[(name, g)] for g in sizes} for name, sizes in space.items()}
    table = LatencyTable(per_layer, 0.0, device=described, input_size=input_size, batch_size=batch_size,
                         dtype=dtype_name, backward=backward, model=model_signature(model), versions=_versions(),
                         settings={"repeats": repeats, "warmup": warmup, "timer": timer, "seed": seed,
                                   **({"cpu_share": round(share, 3)} if device.type == "cpu" else {})},
                         created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    table.rest = statistics.median(medians[config_key(c)] - table(c) for c in references)
    rows = []
    for config in checked:
        measured, predicted = medians[config_key(config)], table(config)
        rows.append({"config": config, "measured_ms": measured, "predicted_ms": predicted,
                     "error_pct": 100 * (predicted - measured) / measured})
    worst = max(rows, key=lambda r: abs(r["error_pct"]), default=None)
    table.prediction = {
        "configs": rows,
        "references": [{"config": c, "measured_ms": medians[config_key(c)]} for c in references],
        "median_abs_error_pct": statistics.median(abs(r["error_pct"]) for r in rows) if rows else None,
        "worst_error_pct": worst["error_pct"] if worst else None}
    return table
