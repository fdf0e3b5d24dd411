"""Stage `profile`: the experiment's latency table (measured on its latency device, `latency.json`) and its checked use."""
from gross import latency
from gross.experiment import resolve_device


def _setting(exp):
    """(table path, device, the measurement's batch size, dtype and mode) of the `latency` section."""
    s = exp.settings.latency
    device = resolve_device(s.device) if s.device else exp.device
    return s.table or exp.path("latency.json"), device, {"batch_size": s.batch_size, "dtype": s.dtype,
                                                         "backward": s.backward}


def profile(exp, model):
    """Measure `model`'s latency table with the `latency` settings and write it (always anew); returns it."""
    path, device, kwargs = _setting(exp)
    s = exp.settings.latency
    table = latency.profile(model, exp.input_size, device=device, repeats=s.repeats, warmup=s.warmup,
                            checks=s.checks, timer=s.timer, seed=exp.seed, progress=exp.progress, **kwargs)
    table.save(path)
    return table


def latency_budget(exp, model, latency_ms=None, latency_of=None):
    """(table, budget in ms) for a budget in ms or the predicted latency of a named configuration;
    (None, None) without either. The table must have been measured for this model, input size,
    device and setting (ValueError naming what differs; FileNotFoundError when there is none)."""
    if latency_ms is None and latency_of is None:
        return None, None
    path, device, kwargs = _setting(exp)
    table = latency.LatencyTable.load(path).check(model=model, input_size=exp.input_size, device=device, **kwargs)
    return table, latency_ms if latency_of is None else table(exp.named_config(model, latency_of)[1])
