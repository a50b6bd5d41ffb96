"""Build mu_fast and its optional extension mu_fast._C.

Extension decision (printed at build time):
* MU_FAST_BUILD_EXT=0   -> no extension; the pure-Python/Triton package still works.
* MU_FAST_BUILD_EXT=1   -> the extension is required; a failed build fails the install.
* unset (auto)          -> try to build; on failure print why and install without it.
CUDA sources (csrc/*.cu) are compiled when the installed torch is a CUDA build and CUDA_HOME exists.
torch.cuda.is_available() is deliberately not consulted: build machines often have no GPU.
MU_FAST_CUDA_ARCHS (default "80;90"), MU_FAST_DEBUG=1, MAX_JOBS and NVCC_THREADS are honoured.
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch in use.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("MU_FAST_BUILD_EXT", "auto").strip().lower()


def _log(msg: str) -> None:
    print(f"[mu_fast setup] {msg}", file=sys.stderr)


def _extension_and_cmdclass():
    if BUILD_EXT in ("0", "false", "no", "off"):
        _log("MU_FAST_BUILD_EXT=0: skipping the extension mu_fast._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:  # pragma: no cover - depends on the build environment
        if BUILD_EXT in ("1", "true", "yes", "on"):
            raise RuntimeError(
                "MU_FAST_BUILD_EXT=1 but torch is not importable in the build environment; install torch "
                "first and build with `pip install --no-build-isolation -e .`"
            ) from err
        _log(f"torch not importable ({err}); building without mu_fast._C")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        _log("no csrc/*.cpp sources; building without mu_fast._C")
        return [], {}

    cuda_home = cpp_extension.CUDA_HOME
    use_cuda = bool(torch.version.cuda) and cuda_home is not None and os.path.isdir(cuda_home) and bool(cuda_sources)
    debug = os.environ.get("MU_FAST_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno: sqrtf that need not set errno lets the compiler vectorize elementwise loops (MaskedAdamW).
    cxx_flags = [*opt, "-std=c++17", "-fopenmp", "-fno-math-errno", "-DMU_FAST_WITH_OPENMP"]
    if "-march" not in os.environ.get("CXXFLAGS", ""):
        # AVX2/FMA are on every x86-64 server we target; plain builds elsewhere.
        import platform

        if platform.machine() in ("x86_64", "AMD64"):
            cxx_flags += ["-mavx2", "-mfma"]
    link_args = ["-fopenmp"]

    if use_cuda:
        archs = os.environ.get("MU_FAST_CUDA_ARCHS", "80;90")
        gencode = []
        for arch in archs.replace(",", ";").split(";"):
            arch = arch.strip().replace(".", "")
            if arch:
                gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        nvcc_flags = [*opt, "-std=c++17", "--use_fast_math", "-lineinfo", *gencode]
        if debug:
            nvcc_flags += ["-G"]
        threads = os.environ.get("NVCC_THREADS")
        if threads:
            nvcc_flags += ["--threads", threads]
        _log(f"building mu_fast._C with CUDA (torch {torch.__version__}, CUDA_HOME={cuda_home}, archs {archs})")
        ext = cpp_extension.CUDAExtension(
            "mu_fast._C",
            sources=cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DMU_FAST_WITH_CUDA"], "nvcc": nvcc_flags + ["-DMU_FAST_WITH_CUDA"]},
            extra_link_args=link_args,
        )
    else:
        why = "torch is a CPU build" if not torch.version.cuda else "CUDA_HOME not found or no .cu sources"
        _log(f"building mu_fast._C for the CPU only ({why}; torch {torch.__version__})")
        ext = cpp_extension.CppExtension(
            "mu_fast._C", sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args
        )

    required = BUILD_EXT in ("1", "true", "yes", "on")

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - re-raised when the build was requested
                if required:
                    raise
                _log(f"building mu_fast._C failed ({err}); installing without it. Set MU_FAST_BUILD_EXT=1 to see the failure.")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_and_cmdclass()

setup(
    name="mu_fast",
    version="0.1.0",
    description="Fast mechanistic unlearning and editing: localization, masked fine-tuning and robustness evals",
    python_requires=">=3.10",
    packages=find_packages(include=["mu_fast", "mu_fast.*"]) + ["mu_fast.kernels"],
    # Triton kernels live in kernels/ and install as mu_fast.kernels (never a top-level `kernels`,
    # which would shadow the Hugging Face `kernels` package).
    package_dir={"mu_fast.kernels": "kernels"},
    package_data={"mu_fast.models": ["configs/*.json"],
                  # the demo's lr choice and the shipped organisms' weights (mu_fast.organism.shipped)
                  "mu_fast.organism": ["demo_lr_choice.json", "shipped/*/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46,<6",
        "tokenizers>=0.20",
        "accelerate>=1.0",
        "bitsandbytes>=0.50,<0.51",
        "peft>=0.13",
        "lm-eval>=0.4.13,<0.5",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pandas>=2.0",
        "pyarrow>=15",
        "typer>=0.12",
        "rich>=13",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "packaging>=23",
        "pyyaml>=6.0",
        "scipy>=1.10",
    ],
    extras_require={"triton": ["triton>=3.2"], "ray": ["ray>=2.9"], "test": ["pytest>=8", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["mu-fast=mu_fast.cli:main"]},
)
