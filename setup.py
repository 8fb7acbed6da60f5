"""Build script: packages, and the C++/CUDA extension where torch is importable at build time.

- ``models/``, ``train/`` and ``triton_kernels/`` install as ``pnnh_kernels.models`` etc. (package_dir),
  so no generic top-level package lands in site-packages.
- The C++ CPU kernels (``csrc/cpu``) are compiled whenever torch is importable (a
  ``--no-build-isolation`` build). CUDA kernels (``csrc/cuda``) are added when torch was built with
  CUDA and a toolkit is found (``CUDA_HOME``) or ``FORCE_CUDA=1``; never decided on
  ``torch.cuda.is_available()``, since build machines often have no GPU.
- Without torch at build time (an isolated ``pip install .``) the package is pure Python and
  ``pnnh_kernels._extension`` compiles the C++ sources on first use (shipped as package data).
- ``PNNH_NO_EXTENSION=1`` skips compiling altogether.
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
MAPPED = {
    "models": "pnnh_kernels.models",
    "train": "pnnh_kernels.train",
    "triton_kernels": "pnnh_kernels.triton_kernels",
}


def _packages():
    packages = find_packages(include=["pnnh_kernels", "pnnh_kernels.*"])
    package_dir = {}
    for folder, name in MAPPED.items():
        if os.path.isfile(os.path.join(HERE, folder, "__init__.py")):
            packages.append(name)
            packages += [f"{name}.{sub}" for sub in find_packages(folder)]
            package_dir[name] = folder
    return packages, package_dir


class BuildPyWithSources(build_py):
    """Copy csrc/ into the package so the first-use compiler finds it after a pure-Python install."""

    def run(self):
        super().run()
        csrc = os.path.join(HERE, "csrc")
        for path in glob.glob(os.path.join(csrc, "**", "*.*"), recursive=True):
            target = os.path.join(self.build_lib, "pnnh_kernels", "_csrc", os.path.relpath(path, csrc))
            self.mkpath(os.path.dirname(target))
            self.copy_file(path, target, preserve_mode=False)


def _cudnn_frontend(cuda_home):
    """The cuDNN fused graphs (csrc/cuda/cudnn_fused.cpp) build where the cudnn-frontend and cuDNN headers are
    found (``pip install nvidia-cudnn-frontend``); the frontend opens libcudnn at run time, torch's copy."""
    import sys

    if os.environ.get("PNNH_NO_CUDNN_FRONTEND") == "1":
        return [], []
    sys.path.insert(0, os.path.join(HERE, "tools"))
    from cudnn_frontend_paths import cudnn_include, frontend_include

    frontend, cudnn = frontend_include(), cudnn_include(cuda_home)
    if frontend is None or cudnn is None:
        return [], []
    macros = [("PNNH_WITH_CUDNN_FRONTEND", None), ("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)]
    return macros, [frontend, cudnn]


def _cxx_standard():
    """pnnh_kernels._extension.cxx_standard, the one rule for the C++ standard (the first-use build uses it
    too), loaded from its file: importing the package would import all of it at build time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_pnnh_extension", os.path.join(HERE, "pnnh_kernels", "_extension.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cxx_standard()


def _extensions():
    if os.environ.get("PNNH_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources:
        return [], {}
    # -fopenmp: without _OPENMP, ATen's header-only at::parallel_for runs every pass on one thread. The
    # link's NEEDED libgomp.so.1 resolves to the libgomp.so.1 torch has already loaded (same soname), so
    # the passes share torch's OpenMP thread pool rather than starting a second runtime.
    # -fno-trapping-math: lets GCC evaluate both arms of a select (the activations' y > 0 ? ...) and so
    # vectorise those loops on AVX2 / SSE, which have no masked arithmetic; nothing here reads FP exception flags.
    std = f"-std={_cxx_standard()}"
    cxx_flags = ["-O3", std, "-fopenmp", "-fno-trapping-math"]
    sources = [os.path.join("csrc", "bindings.cpp"), *cpu_sources]
    cuda_sources = sorted(
        glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
    )
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and (cpp_extension.CUDA_HOME is not None or os.environ.get("FORCE_CUDA") == "1")
    )
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros, include_dirs = _cudnn_frontend(cpp_extension.CUDA_HOME)
        ext = cpp_extension.CUDAExtension(
            "pnnh_kernels._C",
            sources + cuda_sources,
            define_macros=[("PNNH_WITH_CUDA", None), *macros],
            include_dirs=include_dirs,
            extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", std, "--use_fast_math"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "pnnh_kernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


packages, package_dir = _packages()
ext_modules, ext_cmdclass = _extensions()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"pnnh_kernels": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass},
    zip_safe=False,
)
