"""A user's own network for the pipeline tests, loaded as `python:user_nets:small_net` (tests/ is on sys.path)."""
import torch.nn as nn


def small_net(num_classes=10, width=16):
    """Two dense 3×3 convs (decomposable), a depthwise 3×3 and a 1×1 (left alone), then a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def headless_net():
    """A factory without a num_classes keyword: always 5 outputs."""
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


NOT_A_FACTORY = 3
