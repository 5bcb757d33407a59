"""Triton's interpreter, faster: two of its functions redone to skip work whose result they already have.

1. Triton 3.6's interpreter patches the language modules a kernel's globals name (``tl``, ``tl.core``) when a
   launch starts, and undoes it when the launch ends. It also patches them again on every call of a
   ``@triton.jit`` helper inside the kernel (``InterpretedFunction.__call__``), and never undoes that: a scan of
   every member of the modules, about 0.4 ms a call. The kernels call helpers in loops, once a program each, so
   this took over a third of the kernel tests' time (27 of 74 s for ``test_shift_wider_than_a_block`` under
   cProfile). Inside a launch that scan finds nothing left to patch once the launch (or a helper's first call)
   has patched those modules: every builtin is replaced already, and what a call sets again is what was set. So
   inside a launch a helper's call skips it where the modules its globals name have been patched in this launch,
   and patches as before where not. Outside a launch nothing changes.
2. ``_get_np_dtype`` builds a dict of 18 dtypes on every call (every cast, splat and masked load); a scalar
   dtype's answer is now kept. Block and pointer types are unhashable and still go through it.

Together they took ``tests/test_kernels.py`` from 251 to 161 s on the 2-core VM (one run each, one after the
other; the 161 s include this patch's own test). The results are unchanged:
``test_the_interpreter_patch_changes_no_bit`` compares a step's outputs and gradients with and without it.
Only Triton 3.6 is patched (the version the tests pin); on another, nothing is changed. Like the interpreter
itself, this assumes one launch at a time.
"""

from __future__ import annotations

import contextlib
import functools

ORIGINALS: dict[tuple[object, str], object] = {}
"""Triton's own functions, by (owner, name), once installed."""
SKIPPED = [0]
"""Helper calls that skipped the patching, so far."""


def install() -> bool:
    """Patch Triton 3.6's interpreter (once); whether it did."""
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if ORIGINALS:
        return True
    if not triton.__version__.startswith("3.6."):
        return False
    executor, patch_lang, get_np_dtype = interpreter.GridExecutor, interpreter._patch_lang, interpreter._get_np_dtype
    launch = executor.__call__
    lang_modules = tl, tl.core  # those ``_patch_lang`` looks for
    in_launch: list[set[int] | None] = [None]  # ids of the modules patched in the launch in progress, if one is
    langs_of: dict[tuple[object, int], frozenset[int]] = {}

    def langs(fn) -> frozenset[int]:
        # Keyed by the size of the globals too: running a function's rewritten code adds ``tl`` to them.
        key = fn, len(fn.__globals__)
        if key not in langs_of:
            langs_of[key] = frozenset(id(v) for v in fn.__globals__.values() if any(v is m for m in lang_modules))
        return langs_of[key]

    def launch_patching_once(self, *args, **kwargs):
        in_launch[0] = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            in_launch[0] = None

    def patch_lang_once_per_launch(fn):
        patched, modules = in_launch[0], langs(fn)
        if patched is not None and modules and modules <= patched:
            SKIPPED[0] += 1
            return interpreter._LangPatchScope()  # nothing to patch; a helper's scope is never undone anyway
        scope = patch_lang(fn)
        if patched is not None:
            patched.update(modules)
        return scope

    of_scalar = functools.cache(get_np_dtype)
    ORIGINALS.update({(executor, "__call__"): launch, (interpreter, "_patch_lang"): patch_lang,
                      (interpreter, "_get_np_dtype"): get_np_dtype})
    executor.__call__ = launch_patching_once
    interpreter._patch_lang = patch_lang_once_per_launch
    interpreter._get_np_dtype = lambda t: of_scalar(t) if type(t) is tl.dtype else get_np_dtype(t)
    return True


@contextlib.contextmanager
def removed():
    """Triton's own functions back while inside (to compare results with and without the patch)."""
    ours = {key: getattr(*key) for key in ORIGINALS}
    try:
        for (owner, name), fn in ORIGINALS.items():
            setattr(owner, name, fn)
        yield
    finally:
        for (owner, name), fn in ours.items():
            setattr(owner, name, fn)
