"""Stage `train`: the trained network (`base.pt`), loaded from `weights` or trained from scratch (median of runs)."""
import os

from gross import checkpoint, train


def trained(exp):
    """The trained network: loaded from `base.pt`, built with the config's `weights`, or trained from scratch."""
    if "base" in exp.memo:
        return exp.memo["base"]
    path = exp.path("base.pt")
    weights = exp.settings.weights
    if not os.path.exists(path) and not weights and not exp.chain:
        raise ValueError(f"no trained network at {path!r}: run `gross train` first or set weights=FILE")
    exp.snapshot()
    if os.path.exists(path):
        exp.memo["base"] = exp.load(path)
        return exp.memo["base"]
    if weights:
        exp.log(f"[train] loading weights {weights}")
        model = exp.build(weights)
    else:
        recipe = exp.recipes["train"]
        exp.log(f"[train] {exp.name} from scratch: {recipe.runs} run(s) of {recipe.epochs} epochs")
        model, _ = train.train_from_scratch(exp.name, exp.loaders(recipe), recipe, out_dir=exp.path("base"),
                                            seed=exp.seed, device=exp.device, resume=True, progress=exp.progress,
                                            num_classes=exp.num_classes, model_kwargs=exp.settings.model_kwargs)
    model.to(exp.device)
    metrics = exp.accuracies(model)
    exp.log(f"[train] val {metrics['val_acc']:.2%}  test {metrics['test_acc']:.2%}")
    checkpoint.save_model(path, model, exp.record(metrics=metrics))
    exp.memo["base"] = model
    return model
