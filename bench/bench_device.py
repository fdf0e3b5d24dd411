"""The kernel suite's device, decided from torch alone: the suites' conftest sets Triton's
interpreter flag from it before anything imports Triton (gross_kernels, through torch.compile's
machinery, does)."""
import torch


def kernel_device(config):
    """The kernel suite's device name: --bench-device, else cuda when a GPU is visible."""
    chosen = config.getoption("--bench-device")
    return chosen or ("cuda" if torch.cuda.is_available() else "cpu")
