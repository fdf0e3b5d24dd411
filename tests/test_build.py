"""The build: extension loading, registered ops and schemas, and setup.py's CUDA decision logic."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import gross_kernels as gk
from gross_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
built = pytest.mark.skipif(not _extension.load(), reason=f"extension not built: {_extension.error()}")

SCHEMAS = {
    "series_conv_forward": "gross::series_conv_forward(Tensor x, Tensor[] cores, int[] group_sizes, "
    "int group_size, int[] stride, int[] padding, int[] dilation) -> Tensor",
    "series_conv_backward_input": "gross::series_conv_backward_input(Tensor grad_out, Tensor[] cores, "
    "int[] group_sizes, int group_size, int[] input_shape, int[] stride, int[] padding, int[] dilation) -> Tensor",
    "series_conv_backward_weight": "gross::series_conv_backward_weight(Tensor grad_out, Tensor x, "
    "Tensor[] cores, int[] group_sizes, int group_size, int[] stride, int[] padding, int[] dilation) -> Tensor[]",
    "series_bottleneck_forward": "gross::series_bottleneck_forward(Tensor x, Tensor A, Tensor[] cores, "
    "Tensor C, Tensor? bias, int[] group_sizes, int group_size, int[] stride, int[] padding, "
    "int[] dilation) -> Tensor",
}


def _setup_module():
    """setup.py imported as a module (its `main()` only runs as a script)."""
    spec = importlib.util.spec_from_file_location("gross_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@built
def test_extension_loads_and_registers_schemas():
    assert _extension.error() is None
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.gross, name).default._schema) == schema


@built
def test_cpu_kernels_registered_and_cpp_backend_available():
    for name in ("series_conv_forward", "series_conv_backward_input", "series_conv_backward_weight"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gross::{name}", "CPU"), name
    assert _extension.has_cpu_kernels()
    assert "cpp" in gk.available_backends()
    assert "reference" in gk.available_backends()


def test_missing_extension_is_reported_not_raised(monkeypatch):
    """Without _C, load() returns False and keeps the reason; a forced cpp backend says why."""
    monkeypatch.setattr(_extension, "_state", {"loaded": None, "error": None})

    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_extension, "import_module", fail)
    assert _extension.load() is False
    assert "gross_kernels._C" in _extension.error()
    assert not _extension.has_cpu_kernels() and not _extension.has_cuda_kernels()
    assert "cpp" not in gk.available_backends()
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(gk.BackendUnavailableError, match="gross_kernels._C"):
        gk.series_grouped_conv2d(x, [torch.randn(4, 2, 3, 3)], (2,), 2, backend="cpp")


def test_import_without_extension_in_fresh_interpreter():
    """`import gross_kernels` works and the reference backend runs when _C cannot be imported."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gross_kernels._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, gross_kernels as gk\n"
        "assert 'cpp' not in gk.available_backends()\n"
        "x = torch.randn(1, 4, 5, 5)\n"
        "z = gk.series_grouped_conv2d(x, [torch.randn(4, 2, 3, 3)], (2,), 2)\n"
        "print(tuple(z.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("(1, 4, 3, 3)")


@built
def test_cpp_ops_coexist_with_python_custom_ops_in_gross_namespace():
    """A Python custom_op in namespace `gross` defined before and after importing _C: both work."""
    code = (
        "import torch\n"
        "@torch.library.custom_op('gross::probe_before', mutates_args=())\n"
        "def before(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x + 1\n"
        "import gross_kernels._C\n"
        "@torch.library.custom_op('gross::probe_after', mutates_args=())\n"
        "def after(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x * 2\n"
        "x = torch.ones(1, 2, 3, 3)\n"
        "z = torch.ops.gross.series_conv_forward(x, [torch.ones(2, 1, 1, 1)], [1], 1, [1, 1], [0, 0], [1, 1])\n"
        "print(torch.ops.gross.probe_before(x).sum().item(), torch.ops.gross.probe_after(x).sum().item(),"
        " z.sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["36.0", "36.0", "18.0"]


def test_setup_cuda_decision():
    setup = _setup_module()
    assert setup.cuda_enabled("auto", "/cuda", "13.0") is True
    assert setup.cuda_enabled(None, "/cuda", "13.0") is True
    assert setup.cuda_enabled("auto", None, "13.0") is False
    assert setup.cuda_enabled("auto", "/cuda", None) is False
    assert setup.cuda_enabled("0", "/cuda", "13.0") is False
    assert setup.cuda_enabled("1", "/cuda", "13.0") is True
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        setup.cuda_enabled("1", None, "13.0")
    with pytest.raises(RuntimeError, match="CPU-only"):
        setup.cuda_enabled("1", "/cuda", None)
    with pytest.raises(ValueError, match="GROSS_CUDA"):
        setup.cuda_enabled("yes", "/cuda", "13.0")


def test_setup_finds_a_real_toolkit_not_the_nvcc_wrapper_dir(tmp_path):
    setup = _setup_module()
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper_root = tmp_path / "local"  # like /usr/local: bin/nvcc but no CUDA headers
    (wrapper_root / "bin").mkdir(parents=True)
    (wrapper_root / "bin" / "nvcc").write_text("")
    assert setup.is_cuda_toolkit(str(toolkit)) and not setup.is_cuda_toolkit(str(wrapper_root))
    assert setup.find_cuda_home({"CUDA_HOME": str(toolkit)}) == str(toolkit)
    setup.DEFAULT_CUDA_HOME = str(tmp_path / "absent")  # a private copy of the module
    assert setup.find_cuda_home({}, torch_guess=str(wrapper_root)) is None
    assert setup.find_cuda_home({"CUDA_HOME": str(wrapper_root)}, torch_guess=str(toolkit)) == str(toolkit)


def test_setup_sources_include_cuda_only_when_enabled(monkeypatch):
    setup = _setup_module()
    monkeypatch.chdir(ROOT)
    cpu = setup.sources(False)
    assert "csrc/ops/series_conv.cpp" in cpu
    assert any(s.startswith("csrc/ops/cpu/") for s in cpu)
    assert not any("/cuda/" in s for s in cpu)
    assert set(cpu) <= set(setup.sources(True))


def test_setup_extension_cpu_only_when_forced_off(monkeypatch):
    setup = _setup_module()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("GROSS_CUDA", "0")
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/nonexistent"))  # restored afterwards
    ext, _ = setup.extension()
    assert ext.name == "gross_kernels._C"
    assert not any(s.endswith(".cu") or "/cuda/" in s for s in ext.sources)
    assert "-fopenmp" in ext.extra_compile_args["cxx"] and "nvcc" not in ext.extra_compile_args


def test_setup_extension_compiles_cuda_with_default_arch_list(monkeypatch):
    setup = _setup_module()
    if setup.find_cuda_home(os.environ) is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit or CPU-only torch")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("GROSS_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/nonexistent"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)  # restored afterwards
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # extension() repoints it
    ext, _ = setup.extension()
    assert set(setup.sources(True)) == set(ext.sources)
    assert "nvcc" in ext.extra_compile_args
    if not torch.cuda.is_available():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == setup.DEFAULT_ARCH_LIST
