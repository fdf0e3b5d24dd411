"""Stage `finetune`: decompose the trained network at one configuration alone, fine-tune, score and export it."""
import copy
import json
import os

from gross_kernels.files import atomic_write_json

from gross import export, search, train
from gross.config import config_string, series_layers, set_config
from gross.decompose.layer import single_term
from gross.decompose.model import replace_module
from gross.stages.decompose import decomposed


def alone(exp, config):
    """The trained network decomposed at `config` alone: each layer's term at its size from `series_init.pt`.

    A fresh series' partial sums at a size are that size's own BTD (gross.decompose.series), so
    this equals decomposing at `config` again, without running its BTDs a second time.
    """
    model = decomposed(exp)  # a fresh model on every call: loaded or newly converted
    set_config(model, config, complete=True)
    for name, layer in series_layers(model).items():
        replace_module(model, name, single_term(layer, config[name]))
    return model


def finetune(exp, config, run):
    """Fine-tune `config`'s own decomposition with seed + run; result dict cached in finetune/<config>-run<r>.json.

    Run 0's model is exported as plain PyTorch to exported/<config>.pt.
    """
    key = config_string(config)
    tag = f"{key}-run{run}"
    path = exp.path("finetune", f"{tag}.json")
    if os.path.exists(path):
        exp.snapshot()
        with open(path) as f:
            return json.load(f)
    single = exp.memo.get("single")
    if single is None or single[0] != key:  # one decomposition per configuration: its runs are adjacent
        exp.memo["single"] = single = (key, alone(exp, config))
    model = copy.deepcopy(single[1])
    recipe = exp.recipes["finetune"]
    exp.log(f"[finetune] {key} run {run + 1}: {recipe.epochs} epochs")
    # Runs differ in their seed, hence in the order of the training data too.
    train_loader, val_loader, _ = exp.loaders(recipe, seed=exp.seed + run)
    train.finetune(model, config, train_loader, val_loader, recipe, out_dir=exp.path("finetune", tag),
                   device=exp.device, resume=True, seed=exp.seed + run, progress=exp.progress,
                   name=f"finetune {key} (run {run + 1})")
    result = {"config": config, "run": run, "macs": search.MacsTable(model, exp.input_size)(config),
              **exp.accuracies(model)}
    if run == 0:
        result["exported"] = os.path.join("exported", f"{key}.pt")
        export.save(export.to_plain(model, config).cpu().eval(), exp.path(result["exported"]))
    atomic_write_json(path, result)
    return result
