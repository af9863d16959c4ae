"""JIT build of the fused-kernel libraries, cached in a pinned directory.

Independent libraries are built with `torch.utils.cpp_extension.load` (ninja) and loaded as
`torch.ops` namespaces (no pybind11, which keeps the CPU build short):

* `llmk_cpu`  -> `torch.ops.llmk_cpu.*`  from csrc/cpu_*.cpp (one library for every CPU op)
* `llmk_cuda` -> `torch.ops.llmk_cuda.*` from csrc/cuda_*.cu + csrc/cuda_ops.cpp
* `llmk_cuda_emu` -> `torch.ops.llmk_cuda_emu.*`, a TEST TOOL (`load("cuda_emu")`): the same CUDA
  sources compiled as C++ by the host compiler with `-DLLMK_CUDA_EMULATION` (csrc/cuda_emu.h
  emulates the CUDA execution model: threads as coroutines, barriers, warp shuffles, shared
  memory, launch limits), registering the llmk_cuda schemas for CPU tensors, plus the emulator's
  self-tests (csrc/cuda_emu_selftest.cpp).  It runs the CUDA kernels' logic on a machine without
  a GPU (tests/test_kernels_cuda_emu.py); it is slow and is never used for training.  Needs no
  CUDA toolkit.

Build directory: `$LLMK_BUILD_DIR` or `<repo>/build/kernels`, one sub-directory per torch
version, backend and target (e.g. `torch2.13.0_cpu-cpu-avx2`, `torch2.11.0_cu128-cuda12.8-sm80_90`),
so switching environments never reuses a stale object.  torch rebuilds only when the sources or
flags change.  A `fcntl` lock on the directory serialises concurrent builders (data-parallel ranks,
pytest-xdist workers): the first builds, the others wait and then load the result.

Flags: CPU `-O3 -fopenmp` (OpenMP is what makes `at::parallel_for` parallel in an extension), plus
`-mavx2 -mfma -mf16c` when the build machine has them (x86-64; `LLMK_CPU_ISA=generic|avx2`
overrides). CUDA `-O3` and one explicit `-gencode` per architecture: `TORCH_CUDA_ARCH_LIST` if set
(e.g. "8.0;9.0+PTX"), else sm_80 and sm_90 plus the visible GPU's own capability.

Prebuild: `python -m model.kernels.build [--cpu] [--cuda] [--cuda-emu] [--force] [--verbose]`
(`make kernels`; the emulated library only with --cuda-emu).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC = Path(__file__).resolve().parent / "csrc"

CPU_LIB = "llmk_cpu"
CUDA_LIB = "llmk_cuda"
CPU_SOURCES = ("cpu_ops.cpp", "cpu_norms.cpp", "cpu_elementwise.cpp", "cpu_cross_entropy.cpp")
CUDA_SOURCES = ("cuda_ops.cpp", "cuda_norms.cu", "cuda_elementwise.cu", "cuda_cross_entropy.cu")
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")
CUDA_EMU_LIB = "llmk_cuda_emu"
CUDA_EMU_EXTRA_SOURCES = ("cuda_emu_selftest.cpp",)

_STATE_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}  # "cpu" / "cuda" / "cuda_emu" -> torch.ops namespace
_FAILED: dict[str, KernelBuildError] = {}
BUILD_SECONDS: dict[str, float] = {}  # wall time of the load() call (a cache hit is ~0.1 s)


class KernelBuildError(RuntimeError):
    """The fused-kernel library for a backend could not be built or loaded."""


# ------------------------------------------------------------------------------------- paths/flags


def build_root() -> Path:
    return Path(os.environ.get("LLMK_BUILD_DIR") or REPO_ROOT / "build" / "kernels")


def _torch_tag() -> str:
    return "torch" + re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)


def cpu_isa() -> str:
    """'avx2' when the build machine supports AVX2+FMA+F16C (x86-64), else 'generic'."""
    forced = os.environ.get("LLMK_CPU_ISA", "").strip().lower()
    if forced in ("generic", "avx2"):
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    try:
        flags: set[str] = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        return "avx2" if {"avx2", "fma", "f16c"} <= flags else "generic"
    except OSError:
        return "generic"


def cpu_cflags(isa: str | None = None) -> list[str]:
    isa = isa or cpu_isa()
    flags = ["-O3", "-fopenmp", "-DNDEBUG", "-Wno-unused-function"]
    if isa == "avx2":
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def cpu_build_dir() -> Path:
    return build_root() / f"{_torch_tag()}-cpu-{cpu_isa()}"


def cuda_arch_list() -> list[str]:
    """Architectures as 'M.m' strings ('+PTX' / 'a' suffixes kept)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return [a for a in re.split(r"[;\s,]+", env) if a]
    archs = list(DEFAULT_CUDA_ARCHS)
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            own = f"{major}.{minor}"
            if own not in archs:
                archs.append(own)
    return archs


def cuda_gencode_flags(archs: list[str] | None = None) -> list[str]:
    flags = []
    for arch in archs or cuda_arch_list():
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not m:
            raise KernelBuildError(f"bad CUDA architecture {arch!r} (TORCH_CUDA_ARCH_LIST)")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def cuda_cflags(archs: list[str] | None = None) -> list[str]:
    return ["-O3", "-lineinfo", *cuda_gencode_flags(archs)]


def cxx_std_flag() -> str:
    """The C++ standard torch's extension builder uses (c++20 from torch 2.10-ish, else c++17)."""
    from torch.utils import cpp_extension

    with contextlib.suppress(OSError, TypeError):
        if "-std=c++20" in inspect.getsource(cpp_extension):
            return "-std=c++20"
    return "-std=c++17"


def cuda_build_dir() -> Path:
    archs = "_".join(a.replace(".", "").replace("+PTX", "p") for a in cuda_arch_list())
    return build_root() / f"{_torch_tag()}-cuda{torch.version.cuda}-sm{archs}"


def cuda_emu_build_dir() -> Path:
    return build_root() / f"{_torch_tag()}-cuda_emu"


def cuda_emu_cflags() -> list[str]:
    # -fvisibility=hidden: the emulator finds its own static __shared__ variables through this
    # library's symbol table and must not bind to another library's copy of its inline functions.
    return ["-O2", "-DLLMK_CUDA_EMULATION", "-fvisibility=hidden", "-Wno-unknown-pragmas"]


def _cuda_emu_sources(build_dir: Path) -> list[Path]:
    """C++ wrappers that #include each .cu (torch would hand a .cu source to nvcc), written only
    when their text changes so ninja does not rebuild; the .cu files are tracked as headers."""
    src_dir = build_dir / "emu_src"
    src_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name in CUDA_SOURCES:
        if not name.endswith(".cu"):
            out.append(CSRC / name)
            continue
        wrapper = src_dir / f"{name}.cpp"
        text = f'// generated by model/kernels/build.py: {name} compiled for the CUDA emulator\n#include "{name}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        out.append(wrapper)
    return out + [CSRC / s for s in CUDA_EMU_EXTRA_SOURCES]


# ------------------------------------------------------------------------------------------- build


@contextlib.contextmanager
def _dir_lock(directory: Path):
    """Exclusive lock on `directory` for the whole build + load (released if the process dies)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's own FileBaton
        yield
        return
    with open(directory / "llmk-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # torch's FileBaton ('lock') is left behind by a killed build and would make every
            # later build wait forever; while we hold our lock nobody else is building.
            stale = directory / "lock"
            if stale.exists():
                stale.unlink()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_ninja() -> None:
    """torch's JIT needs `ninja` on PATH; with an unactivated venv it sits next to the interpreter."""
    if shutil.which("ninja"):
        return
    candidates = [str(Path(sys.executable).parent)]
    with contextlib.suppress(ImportError):
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, ninja.BIN_DIR)
    for d in candidates:
        if (Path(d) / "ninja").exists():
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _jit_load(name: str, sources, build_dir: Path, verbose: bool, **kwargs) -> None:
    """sources: file names in csrc/, or a callable(build_dir) -> paths (run under the lock)."""
    from torch.utils import cpp_extension

    _ensure_ninja()
    with _dir_lock(build_dir):
        t0 = time.perf_counter()
        paths = sources(build_dir) if callable(sources) else [CSRC / s for s in sources]
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in paths],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
            **kwargs,
        )
        BUILD_SECONDS[name] = time.perf_counter() - t0


def _build(backend: str, verbose: bool) -> object:
    if backend == "cpu":
        _jit_load(CPU_LIB, CPU_SOURCES, cpu_build_dir(), verbose, extra_cflags=cpu_cflags())
        return getattr(torch.ops, CPU_LIB)
    if backend == "cuda":
        if torch.version.cuda is None:
            raise KernelBuildError(f"torch {torch.__version__} is a CPU-only build: no CUDA kernels")
        if not torch.cuda.is_available():
            raise KernelBuildError("no CUDA device is available")
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            raise KernelBuildError("CUDA toolkit (nvcc) not found: set CUDA_HOME")
        _jit_load(CUDA_LIB, CUDA_SOURCES, cuda_build_dir(), verbose, extra_cflags=["-O3"],
                  extra_cuda_cflags=cuda_cflags())
        return getattr(torch.ops, CUDA_LIB)
    if backend == "cuda_emu":
        _jit_load(CUDA_EMU_LIB, _cuda_emu_sources, cuda_emu_build_dir(), verbose, extra_cflags=cuda_emu_cflags())
        return getattr(torch.ops, CUDA_EMU_LIB)
    raise KernelBuildError(f"no fused kernels for device type {backend!r}")


def load(backend: str, verbose: bool = False) -> object:
    """The `torch.ops` namespace of `backend`'s kernels ('cpu', 'cuda', or the test tool 'cuda_emu'),
    building on first use.

    The result (or the failure, as KernelBuildError) is cached for the process."""
    with _STATE_LOCK:
        if backend in _LOADED:
            return _LOADED[backend]
        if backend in _FAILED:
            raise _FAILED[backend]
        try:
            lib = _build(backend, verbose)
        except KernelBuildError as e:
            _FAILED[backend] = e
            raise
        except Exception as e:  # compiler errors, missing ninja/compiler, load failures
            err = KernelBuildError(f"building the {backend} kernels failed: {type(e).__name__}: {e}")
            err.__cause__ = e
            _FAILED[backend] = err
            raise err from e
        _LOADED[backend] = lib
        return lib


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.kernels.build", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="build the CPU kernels")
    p.add_argument("--cuda", action="store_true", help="build the CUDA kernels")
    p.add_argument("--cuda-emu", action="store_true",
                   help="build the CUDA kernels for the CPU emulator (a test tool, see the module docstring)")
    p.add_argument("--force", action="store_true", help="delete the build directory first")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    backends = [b for b in ("cpu", "cuda", "cuda_emu") if getattr(args, b)]
    if not backends:  # default: CPU always, CUDA when this torch + machine can use it
        backends = ["cpu"] + (["cuda"] if torch.version.cuda and torch.cuda.is_available() else [])
    rc = 0
    for backend in backends:
        directory = {"cpu": cpu_build_dir, "cuda": cuda_build_dir, "cuda_emu": cuda_emu_build_dir}[backend]()
        if args.force and directory.exists():
            with _dir_lock(directory):
                for child in directory.iterdir():
                    if child.name != "llmk-build.lock":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        t0 = time.perf_counter()
        try:
            load(backend, verbose=args.verbose)
        except KernelBuildError as e:
            print(f"[model.kernels.build] {backend}: FAILED: {e}", file=sys.stderr)
            rc = 1
            continue
        print(f"[model.kernels.build] {backend}: ok in {time.perf_counter() - t0:.1f}s -> {directory}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
