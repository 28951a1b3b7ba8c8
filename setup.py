"""Build script: pure-Python package plus two optional extensions.

* ``fastgim._C`` (CUDA norms): built only when a CUDA build of torch and ``nvcc`` are both present
  (or ``FASTGIM_BUILD_CUDA=1`` forces it).
* ``fastgim._cpu_kernels`` (the CPU GIM attention backward, ``csrc/cpu/``): built when torch and a
  C++ compiler are present (``FASTGIM_BUILD_CPU=0`` skips it). A failed build only prints a warning:
  at run time fastgim then JIT-builds the kernel if it can, else uses its PyTorch path.

Without either, the package still imports and runs on its Triton / torch backends.
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


#: Same flags as the JIT build in python/fastgim/ops/attention_cpu.py (CXX_FLAGS).
CPU_KERNEL_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
CPU_KERNEL_NAME = "fastgim._cpu_kernels"


def _want_cpu_extension() -> bool:
    if os.environ.get("FASTGIM_BUILD_CPU", "1") == "0":
        return False
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _optional_build_ext(base):
    """``build_ext`` that leaves out the CPU kernel, with a warning, when it fails to compile."""

    class OptionalBuildExt(base):
        def build_extension(self, ext):
            if ext.name != CPU_KERNEL_NAME:
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as error:  # never make installing depend on a working compiler
                print(f"WARNING: fastgim's optional CPU kernel was not built ({error}); "
                      "fastgim will JIT-build it at run time if it can, else use its PyTorch path")
                return None

    return OptionalBuildExt


def _extension_kwargs() -> dict:
    extensions = []
    if _want_cuda_extension():
        from torch.utils.cpp_extension import CUDAExtension

        arch_flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        extensions.append(CUDAExtension(
            name="fastgim._C",
            sources=[os.path.relpath(p, ROOT) for p in _cuda_sources()],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch_flags]},  # torch picks the C++ standard
        ))
    if _want_cpu_extension():
        from torch.utils.cpp_extension import CppExtension

        extensions.append(CppExtension(
            name=CPU_KERNEL_NAME, sources=["csrc/cpu/gim_attention.cpp"], extra_compile_args=CPU_KERNEL_FLAGS,
        ))
    if not extensions:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    build_ext = _optional_build_ext(BuildExtension.with_options(use_ninja=True))
    return {"ext_modules": extensions, "cmdclass": {"build_ext": build_ext}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_kwargs())
