"""Stage `finetune`: decompose the trained network at one configuration alone, fine-tune, score and export it."""
import copy
import json
import os

from gross_kernels.files import atomic_write_json

from gross import export, search, train
from gross.config import config_string
from gross.stages.decompose import decompose


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
        spec = {name: {"group_sizes": [g], "bottleneck": exp.spec[name].get("bottleneck")}
                for name, g in config.items()}
        exp.memo["single"] = single = (key, decompose(exp, spec))
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
