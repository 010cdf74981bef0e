"""Builds slimcore._C, the C++/CUDA ops, with torch.utils.cpp_extension and ninja.

CUDA kernels are compiled whenever a CUDA toolkit and a CUDA-enabled torch are present, with or
without a GPU. Environment switches:
  SLIMCORE_CUDA=1      require the CUDA kernels (fail with a clear message if they cannot be built)
  SLIMCORE_CUDA=0      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST GPU architectures to compile for (default here: "8.0;9.0+PTX")
  CUDA_HOME            CUDA toolkit root (default: found from nvcc, then /usr/local/cuda)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100; PTX for newer GPUs (CUDA 13 needs sm_75+)
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"slimcore setup: {msg}", file=sys.stderr)


def find_cuda_home():
    """Toolkit root holding bin/nvcc and include/cuda_runtime.h.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper
    script (here /usr/local/bin/nvcc), so check candidates for the actual headers.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def decide_cuda():
    """(build_cuda, reason). Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME)."""
    import torch

    forced = os.environ.get("SLIMCORE_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"slimcore setup: SLIMCORE_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "disabled by SLIMCORE_CUDA=0"

    def unavailable(reason):
        if forced == "1":
            raise SystemExit(f"slimcore setup: SLIMCORE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        return False, reason

    if not torch.version.cuda:
        return unavailable(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return unavailable("no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)")
    version = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version is None or version[0] != torch_major:
        return unavailable(
            f"nvcc in {cuda_home} is CUDA {version} but torch was built with CUDA {torch.version.cuda}; "
            "their major versions must match"
        )
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Without a visible GPU torch cannot pick an architecture (IndexError in _get_cuda_arch_flags).
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return True, f"CUDA {version[0]}.{version[1]} from {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"


def nvidia_wheel_include_dirs():
    """Headers such as cusparse.h that ship in torch's nvidia-* wheels rather than the system toolkit."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def openmp_available():
    """torch's CPU ops run on OpenMP (Linux wheels) and GCC is the host compiler."""
    import torch

    return torch.backends.openmp.is_available() and sys.platform.startswith("linux")


def write_build_config(build_cuda, arch_list):
    import torch

    config = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": build_cuda,
        "cuda_arch_list": arch_list if build_cuda else None,
    }
    path = os.path.join(ROOT, "slimcore", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"BUILD_CONFIG = {config!r}\n")


def extension():
    build_cuda, reason = decide_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    log(("building CUDA kernels: " if build_cuda else "CPU kernels only: ") + reason)
    sources = ["csrc/ops.cpp", "csrc/penalty_args.cpp", "csrc/python_module.cpp"]
    sources += ["csrc/channel_gather_args.cpp", "csrc/channel_gather_autograd.cpp"]
    sources += ["csrc/batch_norm_args.cpp", "csrc/batch_norm_autograd.cpp"]
    sources += ["csrc/channel_affine_args.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC if-convert the NaN-propagating selects and vectorise the loops.
    cxx_flags = ["-O3", "-fno-trapping-math", "-DPy_LIMITED_API=0x030A0000"]
    link_flags = []
    if openmp_available():
        # at::parallel_for is a header template: compiled without OpenMP it runs every range on the
        # calling thread. At run time the calls go to torch's own libgomp (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, py_limited_api=True)
    write_build_config(build_cuda, os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if not build_cuda:
        return CppExtension("slimcore._C", sources, **kwargs)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
    kwargs["include_dirs"] = nvidia_wheel_include_dirs()
    return CUDAExtension("slimcore._C", sources, **kwargs)


def main():
    ext = extension()  # first: it fixes CUDA_HOME before cpp_extension reads it on import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
