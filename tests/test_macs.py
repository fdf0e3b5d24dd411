"""gross.macs: exact MAC counts against hand counts (4-layer net, original and decomposed)."""
import pytest
import torch
import torch.nn as nn

from gross import config, count_macs, macs, models
from pipeline_helpers import series_four_layer

# Hand counts for one 3×32×32 input. A conv costs (output elements) × (C_in / groups) × kh × kw.
CONV1 = 32 * 32 * 32 * 3 * 9        # 884,736
CONV2 = 32 * 16 * 16 * 32 * 9       # 2,359,296
CONV3 = 64 * 8 * 8 * 32 * 9         # 1,179,648
CONV4 = 64 * 4 * 4 * 64 * 9         # 589,824
FC = 256 * 256 + 256 * 10


def _series_hand_count(g2, g3, g4):
    # Decomposed layer with bottleneck S = T = C_in: 1×1 (C_in→S) + grouped 3×3 (S→T, G per group) + 1×1 (T→C_out).
    conv2 = 32 * 32 * 16 * 16 + 32 * g2 * 9 * 16 * 16 + 32 * 32 * 16 * 16
    conv3 = 32 * 32 * 8 * 8 + 32 * g3 * 9 * 8 * 8 + 64 * 32 * 8 * 8
    conv4 = 64 * 64 * 4 * 4 + 64 * g4 * 9 * 4 * 4 + 64 * 64 * 4 * 4
    return CONV1 + conv2 + conv3 + conv4 + FC


def test_original_four_layer():
    assert count_macs(models.build("four_layer"), (3, 32, 32)) == CONV1 + CONV2 + CONV3 + CONV4 + FC == 5_081_600


@pytest.mark.parametrize("sizes", [(32, 32, 64), (1, 1, 1), (4, 16, 2), (8, 8, 8)])
def test_decomposed_four_layer(sizes):
    model = series_four_layer()
    config.set_config(model, dict(zip(["conv2", "conv3", "conv4"], sizes)))
    assert count_macs(model, (3, 32, 32)) == _series_hand_count(*sizes)
    # the exported plain layers (three nn.Conv2d each) must cost the same
    for name, layer in config.series_layers(model).items():
        setattr(model, name, layer.export())
    assert count_macs(model, (3, 32, 32)) == _series_hand_count(*sizes)


def test_grouped_strided_conv_and_linear_on_sequences():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), nn.Flatten(2), nn.Linear(25, 6))
    # conv: output 8×5×5, each 2×3×3 MACs; linear on (8, 25): 8 rows × 25 × 6
    assert count_macs(net, (4, 9, 9)) == 8 * 5 * 5 * 2 * 9 + 8 * 25 * 6


def test_per_layer_rows_and_table():
    model = series_four_layer()
    model.train()
    weights = [p.clone() for p in model.parameters()]
    total, rows = count_macs(model, (3, 32, 32), per_layer=True)
    assert model.training and all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]
    assert rows[0]["macs"] == CONV1 and rows[1]["group_size"] == 32 and rows[0]["group_size"] is None
    assert rows[2]["input"] == (32, 8, 8) and rows[2]["output"] == (64, 8, 8)
    assert sum(r["macs"] for r in rows) == total
    table = macs.format_table(rows)
    assert f"| **total** | | | | | {total:,} |" in table and "| conv3 | SeriesConv2d | 32×8×8 | 64×8×8 | 32 |" in table


def test_batch_norm_model_counts_without_touching_statistics():
    model = models.build("resnet18")
    bn = model.bn1
    before = bn.running_mean.clone()
    assert count_macs(model, (3, 224, 224)) == 1_814_073_344  # torchvision ResNet-18: 1.81 GMACs
    assert torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("bad", [(32, 32), (3, 32, 0), "3x32x32", (3, 32.0, 32)])
def test_bad_input_size(bad):
    with pytest.raises(ValueError, match="input_size"):
        count_macs(models.build("four_layer"), bad)
