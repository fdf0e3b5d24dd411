"""Build gross_kernels._C (C++ CPU kernels, CUDA kernels when a toolkit is present) and install both packages."""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda-13.0"
DEFAULT_ARCH_LIST = "8.0;9.0"


def is_cuda_toolkit(path):
    """Whether `path` looks like a CUDA toolkit root (nvcc and the runtime headers)."""
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home(environ, torch_guess=None):
    """CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else /usr/local/cuda-13.0, else torch's guess; None if none is valid.

    torch's own guess is checked too, because `/usr/local/bin/nvcc` can be a wrapper script that
    makes it guess `/usr/local`, where linking fails on -lcudart.
    """
    for path in (environ.get("CUDA_HOME"), environ.get("CUDA_PATH"), DEFAULT_CUDA_HOME, torch_guess):
        if is_cuda_toolkit(path):
            return path
    return None


def cuda_enabled(gross_cuda, cuda_home, torch_cuda_version):
    """Whether to compile the CUDA kernels, from GROSS_CUDA ('auto', '1', '0'), the toolkit and torch's CUDA version.

    'auto' needs both a toolkit and a CUDA build of torch; a visible GPU is not required, so a
    GPU-less build machine still compiles (and type-checks) the CUDA sources.
    """
    mode = (gross_cuda or "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"GROSS_CUDA must be 'auto', '1' or '0', got {gross_cuda!r}")
    if mode == "0":
        return False
    found = cuda_home is not None and torch_cuda_version is not None
    if mode == "1" and not found:
        raise RuntimeError(
            "GROSS_CUDA=1 but CUDA cannot be built: "
            + ("no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else "torch is a CPU-only build"))
    return found


def sources(cuda):
    """The extension's source files, relative to the repository root."""
    files = sorted(glob.glob("csrc/ops/*.cpp")) + sorted(glob.glob("csrc/ops/cpu/*.cpp"))
    if cuda:
        files += sorted(glob.glob("csrc/ops/cuda/*.cpp")) + sorted(glob.glob("csrc/ops/cuda/*.cu"))
    return files


def extension():
    """The `gross_kernels._C` extension and the build command class."""
    cuda_home = find_cuda_home(os.environ)
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    if cuda_home is None:
        cuda_home = find_cuda_home({}, cpp_extension.CUDA_HOME)
    cuda = cuda_enabled(os.environ.get("GROSS_CUDA"), cuda_home, torch.version.cuda)
    # at::parallel_for is inlined from ATen's OpenMP headers, so the kernels need -fopenmp
    # themselves to run in parallel.
    extra = {"cxx": ["-O3", "-fopenmp"]}
    if cuda:
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a GPU to probe, torch cannot choose the architectures itself.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        extra["cxx"].append("-DGROSS_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DGROSS_WITH_CUDA"]
        make = cpp_extension.CUDAExtension
    else:
        make = cpp_extension.CppExtension
    ext = make(
        name="gross_kernels._C",
        sources=sources(cuda),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)


def main():
    """Run setuptools with both packages and the extension."""
    ext, build_ext = extension()
    setup(
        packages=find_packages(include=["gross_kernels", "gross_kernels.*"])
        + find_packages("python", include=["gross", "gross.*"]),
        package_dir={"gross": "python/gross"},
        package_data={"gross": ["configs/*.yaml"]},
        ext_modules=[ext],
        cmdclass={"build_ext": build_ext},
    )


if __name__ == "__main__":
    main()
