"""`gross demo` end to end with tiny schedules: table printed, files written, exported model usable, rerun resumes."""
import json
import os
import subprocess
import sys

import torch

from gross import cli, data, export
from pipeline_helpers import tiny_demo_overrides

TINY = tiny_demo_overrides(2, "[8]", "{conv2: {group_sizes: [8, 32], bottleneck: 32}, "
                                     "conv3: {group_sizes: [8, 32], bottleneck: 32}, "
                                     "conv4: {group_sizes: [8, 64], bottleneck: 64}}")


def test_demo_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    out_dir = str(tmp_path / "demo")
    assert cli.main(["demo", "--out", out_dir, *TINY]) == 0
    out = capsys.readouterr().out
    assert "| budget | method | configuration | MACs |" in out and "| 8 | uniform | 8-8-8 |" in out
    assert "demo finished in" in out
    for name in ("table.md", "results.csv", "results.json", "pareto.png", "search.jsonl"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0
    with open(os.path.join(out_dir, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    results = json.load(open(os.path.join(out_dir, "results.json")))
    assert len(results["searched"]) == 8  # every configuration of the 2·2·2 space
    uniform, searched = results["rows"]
    assert searched["macs"] <= uniform["macs"] and searched["search_val_acc"] >= uniform["search_val_acc"]
    assert len(uniform["test_accs"]) == 2

    # The exported model is plain PyTorch and scores what the fine-tuning run recorded.
    plain = export.load(os.path.join(out_dir, searched["exported"]))
    assert not any(type(m).__module__.startswith("gross_kernels") for m in plain.modules())
    _, _, test = data.load_embedded()
    x = torch.stack([test[i][0] for i in range(100)])  # data.limit=100
    y = torch.stack([test[i][1] for i in range(100)])
    with torch.no_grad():
        acc = (plain(x).argmax(1) == y).float().mean().item()
    assert abs(acc - searched["test_accs"][0]) < 0.01  # at most a rounding-level argmax flip

    # A rerun finds every stage done: nothing is trained or evaluated again, the table is the same.
    import gross.search
    import gross.train

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(gross.train, "fit", forbidden)
    monkeypatch.setattr(gross.search, "evaluate", forbidden)
    before = open(os.path.join(out_dir, "table.md")).read()
    assert cli.main(["demo", "--out", out_dir, *TINY]) == 0
    assert open(os.path.join(out_dir, "table.md")).read() == before


def test_shipped_demo_compares_at_least_three_runs():
    cfg = cli.load_config("demo")
    assert cfg["reproduce"]["runs"] >= 3 and len(cfg["reproduce"]["budgets"]) >= 1


def test_module_entry_point_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-m", "gross.cli", "demo", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "--out" in done.stdout
