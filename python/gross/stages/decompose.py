"""Stage `decompose`: the trained network with the spec's layers as group-size series (`series_init.pt`)."""
import os

from gross import checkpoint
from gross.decompose import convert
from gross.stages.train import trained


def decomposed(exp):
    """The series model straight after decomposition (`series_init.pt`)."""
    path = exp.path("series_init.pt")
    if os.path.exists(path):
        exp.snapshot()
        return exp.load(path)
    base = trained(exp)
    d = exp.settings.decompose
    exp.log(f"[decompose] {len(exp.spec)} layers, init={d.init}")
    model = convert(base, exp.spec, inplace=False, progress=exp.progress, init=d.init, tol=d.tol,
                    max_iter=d.max_iter, method=d.method, workers=d.workers).to(exp.device)
    checkpoint.save_model(path, model, exp.record(exp.spec))
    return model
