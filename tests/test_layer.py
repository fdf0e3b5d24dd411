"""SeriesConv2d: export equivalence at every size, state_dict, init, group-size control, MACs."""
import pytest
import torch
from torch import nn

import gross_kernels as gk
from oracle import naive_bottleneck

LAYERS = [
    # (C_in, C_out, k, group_sizes, bottleneck, stride, padding, dilation, bias)
    (8, 8, 3, (1, 2, 4, 8), None, 1, 1, 1, True),
    (16, 12, 3, (3, 9, 18), (18, 12), 2, 1, 1, True),      # non-power-of-two series, S ≠ T
    (6, 10, 3, (5, 10), (10, 24), 1, 2, 2, False),         # high-compression VGG conv2_1 shape
    (5, 7, (3, 1), (1, 2), (4, 8), (2, 1), (1, 0), 1, True),
    (12, 6, 5, (4, 12), 12, 1, 2, 1, True),
]


def _random_layer(spec, dtype=torch.float32):
    C_in, C_out, k, sizes, bottleneck, stride, padding, dilation, bias = spec
    layer = gk.SeriesConv2d(C_in, C_out, k, sizes, bottleneck=bottleneck, stride=stride,
                            padding=padding, dilation=dilation, bias=bias).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # every term non-zero, unlike the default init
    return layer


@pytest.mark.parametrize("spec", LAYERS)
def test_export_matches_layer_at_every_group_size(spec):
    layer = _random_layer(spec)
    x = torch.randn(2, spec[0], 11, 9)
    for G in layer.group_sizes:
        layer.group_size = G
        plain = layer.export()
        assert isinstance(plain, nn.Sequential) and all(isinstance(m, nn.Conv2d) for m in plain)
        assert plain[1].groups == layer.bottleneck[0] // G
        y, y_plain = layer(x), plain(x)
        rel = (y - y_plain).norm() / y.norm()
        assert rel < 1e-5, f"group size {G}: relative error {rel}"


@pytest.mark.parametrize("spec", LAYERS)
def test_layer_matches_naive_oracle(spec):
    layer = _random_layer(spec, torch.float64)
    x = torch.randn(3, spec[0], 10, 9, dtype=torch.float64)
    for G in layer.group_sizes:
        layer.group_size = G
        expected = naive_bottleneck(x, list(layer.firsts), list(layer.cores), list(layer.lasts),
                                    layer.bias, layer.group_sizes, G, layer.stride, layer.padding,
                                    layer.dilation)
        torch.testing.assert_close(layer(x), expected)


def test_state_dict_round_trip_keeps_weights_and_group_size():
    layer = _random_layer(LAYERS[1])
    layer.group_size = 9
    other = gk.SeriesConv2d(16, 12, 3, (3, 9, 18), bottleneck=(18, 12), stride=2, padding=1)
    other.load_state_dict(layer.state_dict())
    assert other.group_size == 9
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    mismatched = gk.SeriesConv2d(16, 12, 3, (9, 18), bottleneck=(18, 12), stride=2, padding=1)
    with pytest.raises(Exception, match="group_sizes|size mismatch|Missing|Unexpected"):
        mismatched.load_state_dict(layer.state_dict())


def test_init_is_deterministic_under_manual_seed_and_every_size_starts_equal():
    torch.manual_seed(3)
    a = gk.SeriesConv2d(8, 8, 3, (1, 2, 4), padding=1)
    torch.manual_seed(3)
    b = gk.SeriesConv2d(8, 8, 3, (1, 2, 4), padding=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.cores[0].abs().sum() > 0 and a.firsts[0].abs().sum() > 0
    x = torch.randn(1, 8, 6, 6)
    outputs = []
    for G in a.group_sizes:
        a.group_size = G
        outputs.append(a(x))
    # Residual terms start at zero: every group size computes the smallest size's function.
    for y in outputs[1:]:
        torch.testing.assert_close(y, outputs[0])


def test_group_size_property_and_sampling():
    layer = gk.SeriesConv2d(8, 8, 3, (1, 2, 4, 8))
    assert layer.group_size == 8
    layer.group_size = 2
    assert layer.group_size == 2
    gen = torch.Generator().manual_seed(0)
    seen = {layer.sample_group_size(gen) for _ in range(200)}
    assert seen == {1, 2, 4, 8}
    assert layer.group_size in seen


def test_extra_repr_is_helpful():
    text = repr(gk.SeriesConv2d(6, 10, 3, (5, 10), bottleneck=(10, 24), padding=1, bias=False))
    for words in ("6, 10", "group_sizes=(5, 10)", "bottleneck=(10, 24)", "group_size=10",
                  "padding=(1, 1)", "bias=False"):
        assert words in text


def test_gradients_reach_only_active_terms():
    layer = _random_layer(LAYERS[0])
    layer.group_size = 2
    layer(torch.randn(2, 8, 6, 6)).square().sum().backward()
    for params in (layer.firsts, layer.cores, layer.lasts):
        assert params[0].grad.abs().sum() > 0 and params[1].grad.abs().sum() > 0
        assert params[2].grad is None and params[3].grad is None


def test_macs_counts_three_convolutions():
    layer = gk.SeriesConv2d(16, 12, 3, (3, 9, 18), bottleneck=(18, 12), stride=2, padding=1)
    layer.group_size = 9
    # 1×1 at 8×8: 16·18·64; core at 4×4: 12·9·9·16; 1×1 at 4×4: 12·12·16
    assert layer.macs((8, 8)) == 16 * 18 * 64 + 12 * 9 * 9 * 16 + 12 * 12 * 16
