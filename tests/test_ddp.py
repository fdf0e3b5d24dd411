"""DDP: `torchrun` with 2 CPU processes (gloo) trains exactly like one process on the doubled batch."""
import json
import textwrap

import pytest
import torch

from gross import data, train
from pipeline_helpers import one_thread, run_torchrun, series_four_layer, small_embedded  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = ("plain", "search")

# Shared by the workers and the single-process reference, so both build the same run.
_SETUP = textwrap.dedent("""
    import torch
    from gross import models, train
    from pipeline_helpers import series_four_layer

    def setup(mode):
        torch.manual_seed(0)
        model = series_four_layer() if mode == "search" else models.build("four_layer")
        recipe = train.Recipe(epochs=2, lr=0.05, milestones=(1,), sample=mode == "search",
                              series_only=mode == "search")
        return model, recipe
""")

_WORKER = _SETUP + textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    import gross_kernels as gk
    from gross import data, distributed
    from pipeline_helpers import small_embedded

    torch.set_num_threads(1)
    rank, world = distributed.init_from_env("gloo")  # joins the group torchrun describes
    assert world == 2 and dist.get_backend() == "gloo"
    for mode in sys.argv[2:]:
        out = f"{sys.argv[1]}/{mode}"
        model, recipe = setup(mode)
        loaders = data.make_loaders(*small_embedded(128, 64), batch_size=16, shuffle=False)
        result = train.fit(model, loaders[0], loaders[1], recipe, out_dir=out, progress=False, device="cpu", seed=4)
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
        with open(f"{out}/history{rank}.json", "w") as f:
            json.dump(result.history, f)
        with open(f"{out}/dispatch{rank}.json", "w") as f:
            json.dump([[r["key"], r["winner"], r["source"]] for r in gk.dispatch_report(show=False)], f)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun launch (2 processes) training every mode; returns the output folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_torchrun(_WORKER, tmp, *MODES)
    return tmp


@pytest.mark.parametrize("mode", MODES)
def test_torchrun_two_processes_match_single_process(ddp_runs, mode):
    out = ddp_runs / mode
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    histories = [json.loads((out / f"history{r}.json").read_text()) for r in range(2)]

    namespace = {}
    exec(_SETUP, namespace)
    model, recipe = namespace["setup"](mode)
    # Unshuffled: rank 0 sees samples 0, 2, 4, …, rank 1 sees 1, 3, 5, …, so the averaged
    # gradient of two 16-sample batches is the gradient of one 32-sample batch.
    loaders = data.make_loaders(*small_embedded(128, 64), batch_size=32, shuffle=False)
    single = train.fit(model, loaders[0], loaders[1], recipe, progress=False, device="cpu", seed=4)

    for key, value in single.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ranks[0][key], ranks[1][key]), key  # replicas stay identical
            assert torch.allclose(ranks[0][key], value, rtol=1e-4, atol=1e-6), key
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in histories[0]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in histories[1]]
    for row_ddp, row_single in zip(histories[0], single.history):
        assert row_ddp["train_loss"] == pytest.approx(row_single["train_loss"], rel=1e-4)
        for key in row_single:
            if key.startswith("val_acc"):
                assert row_ddp[key] == row_single[key]  # exact shards, summed counts
    assert (out / train.CHECKPOINT_NAME).exists() and (out / "metrics.csv").exists()


def test_torchrun_ranks_run_the_same_backend_without_collectives(ddp_runs):
    decisions = [json.loads((ddp_runs / "search" / f"dispatch{r}.json").read_text()) for r in range(2)]
    assert decisions[0] and decisions[0] == decisions[1]
    assert {source for _, _, source in decisions[0]} == {"static (torchrun)"}
