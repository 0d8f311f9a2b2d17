"""Install fsmooth; build the optional CUDA extension ``fsmooth._C`` from ``csrc/``.

The extension is built only when torch and a CUDA toolkit (nvcc) are present;
set ``FSMOOTH_SKIP_CUDA_BUILD=1`` to skip it. Without it, fsmooth works and
falls back to engines that need no extension. Build with
``pip install --no-build-isolation .`` so the build uses the installed torch.
"""
import glob
import importlib.util
import os
import shutil
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_include_dirs():
    """Headers (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include, shipped by pip's nvidia packages."""
    dirs = []
    try:
        import nvidia
        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return dirs


def _sources_digest() -> str:
    """fsmooth._ext.sources_digest of csrc/, loaded from its file: building must not import the package."""
    spec = importlib.util.spec_from_file_location("_fsmooth_ext_for_build", os.path.join(ROOT, "fsmooth", "_ext.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources_digest(os.path.join(ROOT, "csrc"))


def _extensions():
    if os.environ.get("FSMOOTH_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
        # torch guesses CUDA_HOME from nvcc's location, which a wrapper script in /usr/local/bin misleads.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: skipping the CUDA extension fsmooth._C "
                      "(install with --no-build-isolation to build it)")
        return [], {}
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        warnings.warn("no CUDA toolkit (nvcc) found: skipping the CUDA extension fsmooth._C; "
                      "fsmooth falls back to engines that do not need it")
        return [], {}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            # No GPU to ask (CI, build hosts): Ampere and Hopper, the targets of the CUDA-graph engine.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return [], {}
    import torch
    # What the build compiled against, readable at run time (fsmooth._ext.stale_reason): an extension built
    # for another torch or from older sources is rebuilt instead of trusted.
    build_info = [f'-DFSMOOTH_BUILD_TORCH_VERSION="{torch.__version__}"',
                  f'-DFSMOOTH_BUILD_CUDA_VERSION="{torch.version.cuda}"',
                  f'-DFSMOOTH_BUILD_SOURCES_DIGEST="{_sources_digest()}"']
    ext = CUDAExtension(
        name="fsmooth._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
        extra_compile_args={"cxx": ["-O3"] + build_info, "nvcc": ["-O3"]},
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fsmooth",
    version="0.1.0",
    description="Feature-smoothing training and GPU-accelerated Active Defense against adversarial examples",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships inside the package as fsmooth.kernels: no generic top-level name in site-packages.
    packages=["fsmooth", "fsmooth.commands", "fsmooth.models", "fsmooth.defense", "fsmooth.evaluation",
              "fsmooth.kernels"],
    package_dir={"fsmooth": "fsmooth", "fsmooth.kernels": "kernels"},
    package_data={"fsmooth.models": ["weights/*.safetensors", "weights/*.json", "weights/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "torchvision",
        "numpy",
        "pyautoattack",
        "ninja",
        "safetensors",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    # pytest-timeout: the GPU test step interrupts a hung test (bench/gpu_suite.py, --timeout-method thread);
    # pytest-xdist: the README's test command runs on every core (-n auto).
    extras_require={"test": ["pytest", "pytest-timeout", "pytest-xdist", "torchattacks"]},
    entry_points={"console_scripts": ["fsmooth = fsmooth.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
