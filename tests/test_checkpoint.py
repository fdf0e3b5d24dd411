"""gross.checkpoint: atomic save, verified load, refusal of corrupt or mismatched files."""
import json
import os

import pytest
import torch

from gross import checkpoint, models
from gross.checkpoint import CheckpointError


def _payload():
    return {"model": {"w": torch.randn(4, 3)}, "epoch": 3, "history": [{"loss": 1.5}]}


def test_roundtrip_and_signature(tmp_path):
    path = tmp_path / "ckpt.pt"
    payload = _payload()
    checkpoint.save(path, payload, {"model": "abc", "seed": 1})
    loaded = checkpoint.load(path, {"model": "abc"})
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"]) and loaded["epoch"] == 3
    assert checkpoint.read_header(path)["signature"] == {"model": "abc", "seed": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    with pytest.raises(CheckpointError, match=r"does not match: seed: file has 1, expected 2"):
        checkpoint.load(path, {"seed": 2})


def _rewrite(path, transform):
    data = path.read_bytes()
    path.write_bytes(transform(data))


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[:-10], "corrupt"),                                      # truncated
    (lambda d: d[:-5] + bytes([d[-5] ^ 0xFF]) + d[-4:], "corrupt"),      # one flipped byte
    (lambda d: b"PK\x03\x04" + d, "not a gross checkpoint"),             # some other file
    (lambda d: d.replace(b'"format": 1', b'"format": 9', 1), "format 9"),  # a newer format
    (lambda d: d.split(b"\n", 1)[0] + b"\n{broken\n" + d.split(b"\n", 2)[2], "corrupt header"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload())
    _rewrite(path, damage)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nothing.pt")


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload(), {"epoch": 1})
    good = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"model": {"w": torch.zeros(1)}}, {"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert checkpoint.load(path, {"epoch": 1})["epoch"] == 3
    with pytest.raises(TypeError, match="payload must be a dict"):
        checkpoint.save(path, [1, 2])
    assert path.read_bytes() == good


def test_weights_refuse_another_architecture(tmp_path):
    path = tmp_path / "weights.pt"
    four = models.build("four_layer")
    checkpoint.save_weights(path, four, meta={"name": "four_layer"})
    other = models.build("four_layer")
    assert checkpoint.load_weights(path, other) == {"name": "four_layer"}
    assert all(torch.equal(a, b) for a, b in zip(four.state_dict().values(), other.state_dict().values()))
    assert checkpoint.read_header(path)["signature"]["meta"] == {"name": "four_layer"}
    ten_way = models.build("four_layer", num_classes=5)
    before = [p.clone() for p in ten_way.parameters()]
    with pytest.raises(CheckpointError, match="does not match: model"):
        checkpoint.load_weights(path, ten_way)
    assert all(torch.equal(a, b) for a, b in zip(before, ten_way.parameters()))
    assert checkpoint.is_gross_file(path)
    torch.save({"w": 1}, tmp_path / "plain.pt")
    assert not checkpoint.is_gross_file(tmp_path / "plain.pt")


def test_signature_tracks_shapes_not_values():
    a, b = models.build("four_layer"), models.build("four_layer")
    assert checkpoint.model_signature(a) == checkpoint.model_signature(b)
    assert json.loads(json.dumps(checkpoint.model_signature(a))) == checkpoint.model_signature(a)
    assert checkpoint.model_signature(a) != checkpoint.model_signature(models.build("four_layer", num_classes=3))
