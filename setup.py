"""Build script: pure-Python package plus the optional CUDA extension ``fastgim._C``.

The extension is built only when a CUDA build of torch and ``nvcc`` are both present
(or ``FASTGIM_BUILD_CUDA=1`` forces it); otherwise it is skipped and the package
still imports and runs on its Triton / torch backends.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages("python") + ["fastgim.kernels"]
PACKAGE_DIR = {"": "python", "fastgim.kernels": "kernels"}


def _cuda_sources() -> list[str]:
    patterns = ("csrc/*.cpp", "csrc/*.cu")
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda_extension() -> bool:
    forced = os.environ.get("FASTGIM_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    if not _cuda_sources() or shutil.which("nvcc") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def _extension_kwargs() -> dict:
    if not _want_cuda_extension():
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    extension = CUDAExtension(
        name="fastgim._C",
        sources=[os.path.relpath(p, ROOT) for p in _cuda_sources()],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch_flags]},  # torch picks the C++ standard
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_kwargs())
