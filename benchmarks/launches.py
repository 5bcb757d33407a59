"""The Triton launches fastntm's host code makes, recorded without a GPU and compiled as Triton's launcher
would compile them. Shared by the static kernel checks (``tests/test_kernels_static.py``) and the SASS
instruction model (``benchmarks/sass_model.py``). Compiling needs ``TRITON_INTERPRET`` off.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import tempfile
from typing import NamedTuple

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

# Modules, not the functions of the same names that fastntm.kernels exports.
memory_step = importlib.import_module("fastntm.kernels.memory_step")
heads = importlib.import_module("fastntm.kernels.heads")
KERNEL_MODULES = (memory_step, heads)
"""The modules that define kernels (read.py and write.py launch memory_step.py's)."""
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def kernel_names(module) -> list[str]:
    return [n for n in vars(module) if n.endswith("_kernel")]


def kernel_module(name: str):
    return next(m for m in KERNEL_MODULES if name in vars(m))


def kernel_fn(name: str):
    return vars(kernel_module(name))[name]


class Launch(NamedTuple):
    name: str
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of making it."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, tuple(grid), args, kwargs))


@contextlib.contextmanager
def recording():
    """Within the block every kernel records its launches, in order, to the list this yields."""
    launches: list[Launch] = []
    kernels = {n: kernel_fn(n) for m in KERNEL_MODULES for n in kernel_names(m)}
    try:
        for name in kernels:
            setattr(kernel_module(name), name, _Recorder(name, launches))
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(kernel_module(name), name, kernel)


def memory_step_args(shape, dtype=None) -> tuple:
    """Zero inputs ``(mem, k, beta, g, s, gamma, w_prev, e, a)`` of ``memory_step`` at ``shape`` (a
    ``benchmarks.shapes`` shape), batch 1: a grid scales with B, and recorded launches read no values."""
    import torch

    H, W, M = shape.H, shape.W, shape.M

    def t(*size):
        return torch.zeros(size, dtype=dtype)

    return t(1, shape.N, M), t(1, H, M), t(1, H), t(1, H), t(1, H, shape.S), t(1, H), t(1, H, shape.N), \
        t(1, W, M), t(1, W, M)


class Specialized(NamedTuple):
    """A launch as Triton's launcher compiles it."""

    name: str
    signature: dict
    consts: dict
    attrs: dict
    options: dict

    def own_consts(self) -> dict:
        """The values of the kernel's own constexpr parameters (not the integers a launch specialized to 1)."""
        own = own_constexprs(self.name)
        return {k: v for k, v in self.consts.items() if k in own}


def own_constexprs(name: str) -> set[str]:
    """The names of a kernel's constexpr parameters."""
    return {p.name for p in kernel_fn(name).params if p.is_constexpr}


def specialize(launch: Launch) -> Specialized:
    """Pointers 16-byte aligned and integers that are multiples of 16 marked so (vectorized loads, other
    layouts), integers equal to 1 made constants, as the launcher does."""
    fn = kernel_fn(launch.name)
    options = {k: launch.kwargs[k] for k in ("num_warps", "maxnreg") if k in launch.kwargs}
    bound = dict(zip(fn.arg_names, launch.args), **{k: v for k, v in launch.kwargs.items() if k not in options})
    signature, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], consts[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[param.name], consts[param.name] = "constexpr", spec
        else:
            signature[param.name] = kind
            if spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
    return Specialized(launch.name, signature, consts, attrs, options)


def bound_ints(launch: Launch) -> dict[str, int]:
    """The launch's integer arguments by name (sizes, head counts, flags)."""
    fn = kernel_fn(launch.name)
    bound = dict(zip(fn.arg_names, launch.args), **launch.kwargs)
    return {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}


def compile_kernel(spec: Specialized, arch: int):
    return triton.compile(ASTSource(fn=kernel_fn(spec.name), signature=spec.signature, constexprs=spec.consts,
                                    attrs=spec.attrs),
                          target=GPUTarget("cuda", arch, 32), options=spec.options)


def compile_kernel_for(spec: Specialized, archs) -> list:
    """``compile_kernel`` for each of ``archs``, in their order: the newest from the kernel's source, the others
    from that build's Triton IR (TTIR), so that Python walks the source once. For these kernels Triton's TTIR is
    the same for every NVIDIA target (the cubins come out byte for byte the same). Where it need not be, every
    target builds from source: tensor descriptors (lowered to pointers below sm_90, so the newest target's TTIR
    still shows them) and fp8 types (whose products' accumulation and allowed types depend on the target)."""
    newest = max(archs)
    built = {newest: compile_kernel(spec, newest)}
    ttir = built[newest].asm["ttir"]
    if "tensordesc" in ttir or "f8E" in ttir:
        built.update((arch, compile_kernel(spec, arch)) for arch in archs if arch != newest)
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"{spec.name}.ttir")
            with open(path, "w") as f:
                f.write(ttir)
            built.update((arch, triton.compile(path, target=GPUTarget("cuda", arch, 32), options=spec.options))
                         for arch in archs if arch != newest)
    return [built[arch] for arch in archs]


def run_tool(tool: str, compiled, *flags: str) -> str:
    """Output of ``tool`` (cuobjdump, nvdisasm: Triton's own) on the compiled kernel's cubin, the one a
    launch loads."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([os.path.join(NVIDIA_BIN, tool), *flags, f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
