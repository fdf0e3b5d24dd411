"""`auto`'s dispatch: wrong or failing backends are never chosen, decisions persist on disk safely,
the static rule, and torch.compile agreeing with eager."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gross_kernels as gk
from gross_kernels import backends
from gross_kernels.backends import _autotune, _cache, fastpaths
from gross_kernels.backends.base import Composed
from gross_kernels.backends.reference import Reference
from oracle import dense_grads, naive_bottleneck, naive_series_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_decisions():
    backends.reset()
    yield
    backends.reset()


class _Kernels(Composed):
    """A correct backend with its own kernels (the reference's convolution, gradients by autograd)."""

    name = "test-kernels"

    def unavailable_reason(self, device, dtype):
        return None

    def series_forward(self, x, cores, geom):
        return Reference().series(x, cores, geom)

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        n = geom.num_active
        with torch.enable_grad():
            xl = x.detach().requires_grad_()
            active = [c.detach().requires_grad_() for c in cores[:n]]
            z = Reference().series(xl, active + list(cores[n:]), geom)
            gx, *gcores = torch.autograd.grad(z, [xl, *active], grad_z)
        return (gx if need_x else None), (gcores if need_cores else None)


class _Perturbed(_Kernels):
    """A backend whose series output is off by 1e-3 everywhere."""

    name = "test-perturbed"

    def series_forward(self, x, cores, geom):
        return super().series_forward(x, cores, geom) + 1e-3


class _WrongGradient(_Kernels):
    """Right outputs, but the cores' gradients 1 % too large."""

    name = "test-wrong-gradient"

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        gx, gcores = super().series_backward(grad_z, x, cores, geom, need_x, need_cores)
        return gx, None if gcores is None else [g * 1.01 for g in gcores]


class _FailsAtDepthwise(_Kernels):
    """Raises for group size 1 only; right everywhere else."""

    name = "test-fails-at-1"

    def series_forward(self, x, cores, geom):
        if geom.group_size == 1:
            raise RuntimeError("depthwise is not supported by this test backend")
        return super().series_forward(x, cores, geom)


@pytest.fixture
def registered(monkeypatch):
    """Register test backends, and rig the timing so that a test backend always looks fastest:
    only the correctness check can then keep it out."""
    added = []

    def add(backend):
        added.append(backends.register(backend))
        return backend

    monkeypatch.setattr(_autotune, "_timings", lambda fns, device, repeats: {
        name: 0.001 if name.startswith("test-") else 1.0 for name in fns})
    yield add
    for backend in added:
        backends.unregister(backend.name)


def _layer_inputs(group_size, x_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = (1, 2, 4)
    x = torch.randn(3, 5, 7, 6, generator=gen, requires_grad=x_grad)
    firsts = [torch.randn(4, 5, 1, 1, generator=gen, requires_grad=True) for _ in sizes]
    cores = [torch.randn(8, g, 3, 3, generator=gen, requires_grad=True) for g in sizes]
    lasts = [torch.randn(6, 8, 1, 1, generator=gen, requires_grad=True) for _ in sizes]
    bias = torch.randn(6, generator=gen, requires_grad=True)
    return x, (firsts, cores, lasts, bias, sizes, group_size, 1, 1)


def _leaves(x, args):
    firsts, cores, lasts, bias = args[:4]
    return ([x] if x.requires_grad else []) + [*firsts, *cores, *lasts, bias]


def _winners():
    return {row["key"]: row for row in gk.dispatch_report(show=False)}


@pytest.mark.parametrize("wrong", [_Perturbed, _WrongGradient])
@pytest.mark.parametrize("x_grad", [True, False])
def test_a_wrong_backend_is_never_chosen(registered, wrong, x_grad):
    bad = registered(wrong())
    x, args = _layer_inputs(2, x_grad)
    with pytest.warns(RuntimeWarning, match=f"backend '{bad.name}' excluded"):
        y = gk.series_bottleneck_conv2d(x, *args)
    grads = torch.autograd.grad(y, _leaves(x, args), torch.ones_like(y), allow_unused=True)
    y_ref = naive_bottleneck(x, *args)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    refs = torch.autograd.grad(y_ref, _leaves(x, args), torch.ones_like(y), allow_unused=True)
    for g, g_ref in zip(grads, refs):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)  # None where the oracle's is
    (row,) = _winners().values()
    assert row["winner"] != bad.name and row["candidates"][bad.name]["verdict"] == "rejected"
    # The same signature again: decided, so no second measurement.
    y_again = gk.series_bottleneck_conv2d(x, *args)
    torch.testing.assert_close(y_again, y)
    assert len(_winners()) == 1


def test_a_wrong_series_backend_is_never_chosen(registered):
    bad = registered(_Perturbed())
    x = torch.randn(2, 8, 6, 6)
    cores = [torch.randn(8, g, 3, 3) for g in (2, 4)]
    with pytest.warns(RuntimeWarning, match=bad.name):
        z = gk.series_grouped_conv2d(x, cores, (2, 4), 4, padding=1)
    torch.testing.assert_close(z, naive_series_conv(x, cores, (2, 4), 4, padding=1),
                               rtol=1e-5, atol=1e-5)


def test_a_backend_that_raises_is_excluded_for_that_signature_only(registered):
    flaky = registered(_FailsAtDepthwise())
    x, args = _layer_inputs(1)
    with pytest.warns(RuntimeWarning, match="depthwise is not supported"):
        y = gk.series_bottleneck_conv2d(x, *args)
    torch.testing.assert_close(y, naive_bottleneck(x, *args), rtol=1e-4, atol=1e-4)
    x2, args2 = _layer_inputs(2)
    y2 = gk.series_bottleneck_conv2d(x2, *args2)  # another signature: admitted, and (rigged) fastest
    torch.testing.assert_close(y2, naive_bottleneck(x2, *args2), rtol=1e-4, atol=1e-4)
    verdicts = {row["signature"].split(" G=")[1][0]: row for row in _winners().values()}
    assert verdicts["1"]["candidates"][flaky.name]["verdict"] == "error"
    assert verdicts["1"]["winner"] != flaky.name
    assert verdicts["2"]["winner"] == flaky.name


def test_non_finite_inputs_defer_the_decision():
    x, args = _layer_inputs(2)
    x = x.detach().clone()
    x[0, 0, 0, 0] = float("nan")
    y = gk.series_bottleneck_conv2d(x, *args)
    assert torch.isnan(y).any()
    assert _winners() == {}  # nothing could be verified: decided on the next finite call


def test_static_rule_when_autotuning_is_off():
    gk.set_autotune(False)
    try:
        x, args = _layer_inputs(4)
        gk.series_bottleneck_conv2d(x, *args)
        (row,) = _winners().values()
        assert row["source"] == "static" and row["candidates"] == {}
        sig = next(iter(backends._DECISIONS))
        assert row["winner"] == fastpaths.static_choice(sig)
    finally:
        gk.set_autotune(None)


def test_dispatch_report_prints_every_decision(capsys):
    x, args = _layer_inputs(2)
    gk.series_bottleneck_conv2d(x, *args)
    with torch.no_grad():
        gk.series_bottleneck_conv2d(x, *args)
    rows = gk.dispatch_report()
    printed = capsys.readouterr().out
    assert len(rows) == 2 and "2 signatures" in printed
    assert {"train" in r["signature"] for r in rows} == {True, False}
    for row in rows:
        assert row["source"] == "measured" and row["winner"] in row["candidates"]
        assert row["candidates"]["reference"]["verdict"] == "ok"
        assert row["signature"] in printed


# ---------------------------------------------------------------- torch.compile ----------------

def _compile_case():
    layer = gk.SeriesConv2d(6, 6, 3, (1, 3, 6), padding=1)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    layer.group_size = 3
    return layer, torch.randn(2, 6, 8, 8, requires_grad=True)


def _compiled_and_eager(layer, x, first):
    torch._dynamo.reset()  # trace afresh: a graph compiled by an earlier test carries its own choice
    runs = {}
    for name in (first, "eager" if first == "compiled" else "compiled"):
        fn = torch.compile(layer, fullgraph=True) if name == "compiled" else layer
        out = fn(x)
        leaves = [x, *layer.parameters()]
        runs[name] = (out, dense_grads(torch.autograd.grad(out.square().sum(), leaves,
                                                           allow_unused=True), leaves))
    (out, grads), (eager, eager_grads) = runs["compiled"], runs["eager"]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)
    return {row["source"]: row["winner"] for row in gk.dispatch_report(show=False)}


def test_compiled_layer_undecided_runs_reference_and_matches_eager():
    winners = _compiled_and_eager(*_compile_case(), first="compiled")
    assert winners["traced"] == "reference" and "measured" in winners


def test_compiled_layer_runs_what_eager_decided():
    winners = _compiled_and_eager(*_compile_case(), first="eager")
    assert winners["traced"] == winners["measured"]


def test_compile_with_dynamic_sizes_matches_eager():
    layer, _ = _compile_case()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for n, hw in ((2, 8), (3, 7)):
        x = torch.randn(n, 6, hw, hw)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the disk cache ---------------

_CALL = textwrap.dedent("""
    import json, sys, torch, gross_kernels as gk
    torch.manual_seed(0)
    for c_in in range(int(sys.argv[1]), int(sys.argv[2])):
        x = torch.randn(2, c_in, 5, 5, requires_grad=True)
        layer = gk.SeriesConv2d(c_in, 4, 3, (1, 2, 4), bottleneck=4, padding=1)
        layer.group_size = 2
        layer(x).sum().backward()
    print(json.dumps([[r["key"], r["winner"], r["source"]] for r in gk.dispatch_report(show=False)]))
""")


def _run(cache_dir, first, last, wait=True):
    env = dict(os.environ, GROSS_KERNELS_CACHE=str(cache_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _CALL, str(first), str(last)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _result(proc) if wait else proc


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _stored(cache_dir):
    with open(cache_dir / "dispatch.json") as f:
        content = json.load(f)
    (entries,) = content["environments"].values()
    return entries


def test_cache_round_trip_across_processes(tmp_path):
    first = _run(tmp_path, 3, 5)
    assert {source for _, _, source in first} == {"measured"}
    assert set(_stored(tmp_path)) == {key for key, _, _ in first}
    second = _run(tmp_path, 3, 5)
    assert {source for _, _, source in second} == {"cache"}
    assert [(k, w) for k, w, _ in second] == [(k, w) for k, w, _ in first]


def test_two_processes_writing_at_once_keep_both_decisions(tmp_path):
    procs = [_run(tmp_path, 2, 8, wait=False), _run(tmp_path, 8, 14, wait=False)]
    decided = [key for proc in procs for key, _, _ in _result(proc)]
    assert len(decided) == 12 and set(_stored(tmp_path)) == set(decided)


def test_a_damaged_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("GROSS_KERNELS_CACHE", str(tmp_path))
    _cache.forget()
    (tmp_path / "dispatch.json").write_text('{"format": 1, "environments": {"torch')
    x, args = _layer_inputs(2)
    try:
        with pytest.warns(RuntimeWarning, match="damaged"):
            gk.series_bottleneck_conv2d(x, *args)
        assert len(_stored(tmp_path)) == 1
    finally:
        _cache.forget()


def test_the_cache_key_changes_with_a_version(tmp_path, monkeypatch):
    monkeypatch.setenv("GROSS_KERNELS_CACHE", str(tmp_path))
    _cache.forget()
    try:
        x, args = _layer_inputs(2)
        gk.series_bottleneck_conv2d(x, *args)
        sig = next(iter(backends._DECISIONS))
        before = _cache.environment()
        assert _cache.lookup(sig) is not None
        monkeypatch.setattr(_cache, "_package_version", lambda: "0.0.0-other")
        assert _cache.environment() != before and _cache.lookup(sig) is None
        backends.reset()
        gk.series_bottleneck_conv2d(x, *args)
        assert gk.dispatch_report(show=False)[0]["source"] == "measured"
    finally:
        _cache.forget()


def test_a_win_that_a_second_timing_does_not_confirm_keeps_reference(registered, monkeypatch):
    """The first timing says the test backend is fastest, the second says it is not (a burst of
    load on the reference's calls): `reference` stays."""
    registered(_Kernels())
    calls = []

    def timings(fns, device, repeats):
        calls.append(sorted(fns))
        fast = len(calls) == 1
        return {name: (0.5 if fast else 1.5) if name.startswith("test-") else 1.0 for name in fns}

    monkeypatch.setattr(_autotune, "_timings", timings)
    x, args = _layer_inputs(2)
    y = gk.series_bottleneck_conv2d(x, *args)
    torch.testing.assert_close(y, naive_bottleneck(x, *args), rtol=1e-4, atol=1e-4)
    (row,) = _winners().values()
    assert row["winner"] == "reference" and calls[1] == ["reference", "test-kernels"]
    assert row["candidates"]["test-kernels"]["detail"] == "again 1.500 ms"
