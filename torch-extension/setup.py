"""Build and package the "mapreduce" torch.distributed backend.

The C++ extension is compiled against the PyTorch installed in the environment it is installed
into (an isolated pip build would otherwise fetch a different torch, with a different ABI):

    pip install ./torch-extension                          # finds the environment's torch
    pip install --no-build-isolation ./torch-extension     # same, without fetching setuptools

libmapreduce.so comes from the repository's Cargo build (``target/release``; built with
``cargo build --release --lib`` when it is missing) and is copied into the package next to the
extension, which finds it through an ``$ORIGIN`` rpath: no LD_LIBRARY_PATH is needed.

Environment:
    MAPREDUCE_ROOT          repository root (default: the folder above this file)
    MAPREDUCE_LIB_DIR       use the libmapreduce.so in this folder instead of building one
    MAPREDUCE_CARGO_BUILD=1 run cargo even when target/release/libmapreduce.so exists
    CARGO_TARGET_DIR        honoured as Cargo does
"""

import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup


def _environment_site_packages():
    """The site-packages of the environment this interpreter belongs to."""
    paths = sysconfig.get_paths()
    return [p for p in dict.fromkeys([paths["platlib"], paths["purelib"]]) if os.path.isdir(p)]


try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    # pip builds in an isolated environment by default, which hides the installed torch. The
    # extension must be compiled against exactly the torch it will run with -- the one in the
    # environment being installed into -- so look there rather than fetch another copy.
    sys.path.extend(p for p in _environment_site_packages() if p not in sys.path)
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit(
            "mapreduce-torch builds against the installed PyTorch, but `import torch` failed. "
            "Install torch into this environment first, then: pip install --no-build-isolation ./torch-extension"
        )

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("MAPREDUCE_ROOT", HERE.parent)).resolve()
LIBRARY = "libmapreduce.so"


def header_dir() -> Path:
    """Folder holding mapreduce.h: the repository's generated header."""
    include = ROOT / "include"
    if not (include / "mapreduce.h").is_file():
        sys.exit(f"{include / 'mapreduce.h'} not found; set MAPREDUCE_ROOT to the repository root")
    return include


def cargo_target_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", "target"))
    return target if target.is_absolute() else ROOT / target


def library_dir() -> Path:
    """Folder holding libmapreduce.so, building it with Cargo when needed."""
    explicit = os.environ.get("MAPREDUCE_LIB_DIR")
    if explicit:
        folder = Path(explicit).resolve()
        if not (folder / LIBRARY).is_file():
            sys.exit(f"MAPREDUCE_LIB_DIR={explicit}: no {LIBRARY} there")
        check_exports(folder / LIBRARY)
        return folder

    folder = cargo_target_dir() / "release"
    force = os.environ.get("MAPREDUCE_CARGO_BUILD") == "1"
    if force or not (folder / LIBRARY).is_file():
        if not (ROOT / "Cargo.toml").is_file():
            sys.exit(f"{LIBRARY} not found and {ROOT} has no Cargo.toml; set MAPREDUCE_LIB_DIR")
        cargo = shutil.which("cargo")
        if cargo is None:
            sys.exit(f"{LIBRARY} not found in {folder} and cargo is not on PATH")
        print(f"building {LIBRARY}: cargo build --release --lib in {ROOT}", flush=True)
        subprocess.run([cargo, "build", "--release", "--lib"], cwd=ROOT, check=True)
    if not (folder / LIBRARY).is_file():
        sys.exit(f"cargo finished but {folder / LIBRARY} does not exist")
    check_exports(folder / LIBRARY)
    return folder


def check_exports(path: Path) -> None:
    """Fail early on a library without the C ABI (a stale or partial build): the linker would
    otherwise drop it silently and the extension would fail only at import."""
    try:
        ctypes.CDLL(str(path)).mr_comm_init_rank
    except (OSError, AttributeError) as e:
        sys.exit(f"{path} does not provide the mapreduce C ABI ({e}); rebuild it with cargo build --release")


class BuildWithLibrary(BuildExtension):
    """Links the extension against libmapreduce.so and ships the library beside it."""

    def run(self):
        folder = library_dir()
        for ext in self.extensions:
            ext.library_dirs.append(str(folder))
        super().run()
        for ext in self.extensions:
            dest = Path(self.get_ext_fullpath(ext.name)).parent
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / LIBRARY, dest / LIBRARY)


setup(
    name="mapreduce-torch",
    version="0.1.0",
    description="torch.distributed backend 'mapreduce': ring and relay collectives on CPU tensors",
    license="Apache-2.0",
    packages=["mapreduce_torch"],
    python_requires=">=3.9",
    ext_modules=[
        CppExtension(
            name="mapreduce_torch._C",
            sources=["csrc/ProcessGroupMapReduce.cpp", "csrc/bindings.cpp"],
            include_dirs=[str(header_dir()), str(HERE / "csrc")],
            libraries=["mapreduce"],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
            extra_link_args=["-Wl,-rpath,$ORIGIN"],
        )
    ],
    cmdclass={"build_ext": BuildWithLibrary.with_options(use_ninja=False)},
    zip_safe=False,
)
