"""Stage `train-space`: the series model after search-space training, a random configuration per step (`series.pt`)."""
import os

from gross import checkpoint, train
from gross.stages.decompose import decomposed


def trained_space(exp):
    """The series model after search-space training (`series.pt`)."""
    path = exp.path("series.pt")
    if os.path.exists(path):
        exp.snapshot()
        return exp.load(path)
    if not exp.chain and not os.path.exists(exp.path("series_init.pt")):
        raise ValueError(f"no decomposed model at {exp.path('series_init.pt')!r}: run `gross decompose` first")
    model = decomposed(exp)
    recipe = exp.recipes["search_space"]
    exp.log(f"[train-space] {recipe.epochs} epochs, lr {recipe.lr:g}")
    train_loader, val_loader, _ = exp.loaders(recipe)
    train.train_search_space(model, train_loader, val_loader, recipe, out_dir=exp.path("space"), device=exp.device,
                             resume=True, seed=exp.seed, progress=exp.progress, name="train-space")
    checkpoint.save_model(path, model, exp.record(exp.spec))
    return model
