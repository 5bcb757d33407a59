"""Triton's interpreter, faster: two of its functions redone to skip work whose result they already have.

1. Triton 3.6's interpreter patches the language modules a kernel's globals name (``tl``, ``tl.core``) when a
   launch starts, and undoes it when the launch ends. It also patches them again on every call of a
   ``@triton.jit`` helper inside the kernel (``InterpretedFunction.__call__``): a scan of every member of the
   modules, about 0.4 ms a call. The kernels call helpers in loops, once a program each, so this took over a
   third of the kernel tests' time (27 of 74 s for ``test_shift_wider_than_a_block`` under cProfile). Inside a
   launch that scan finds nothing left to patch: the launch (or the helper's first call) has replaced every
   builtin already, and what a call sets again is what was set. So a helper's call skips it where the modules
   its globals name have been patched in this launch, and patches as before where not.
2. ``_get_np_dtype`` builds a dict of 19 dtypes on every call (every cast, splat and masked load); a scalar
   dtype's answer is now kept. Block types are unhashable and still go through it.

Together they took ``tests/test_kernels.py`` from 251 to 161 s on the 2-core VM (one run each, one after the
other; the 161 s include this patch's own test). The results are unchanged:
``test_the_interpreter_patch_changes_no_bit`` compares a step's outputs and gradients with and without it.
Where the interpreter lacks the functions this relies on (another Triton), nothing is changed.
"""

from __future__ import annotations

import contextlib
import functools

ORIGINALS: dict[str, object] = {}
"""Triton's own functions, by name in ``triton.runtime.interpreter``, once installed."""


def install() -> bool:
    """Patch ``triton.runtime.interpreter`` (once); whether its structure allowed it."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if ORIGINALS:
        return True
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "_get_np_dtype")):
        return False
    patch_lang, get_np_dtype = interpreter._patch_lang, interpreter._get_np_dtype
    lang_modules = tl, tl.core  # those ``_patch_lang`` looks for
    patched: set[int] = set()  # ids of the modules patched in the launch in progress; empty between launches
    langs_of: dict[object, frozenset[int]] = {}

    def langs(fn) -> frozenset[int]:
        if fn not in langs_of:
            langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values() if any(v is m for m in lang_modules))
        return langs_of[fn]

    def patch_lang_once_per_launch(fn):
        if patched and langs(fn) <= patched:
            return interpreter._LangPatchScope()  # a helper's call inside the launch: nothing to patch or undo
        scope = patch_lang(fn)
        launch_started = not patched
        patched.update(langs(fn))
        if not launch_started:  # a helper naming modules the launch did not (``tl.sum``'s ``core``): patched and
            return scope  # never undone, as before; its next calls in this launch skip
        restore = scope.restore

        def restore_and_end_launch():
            patched.clear()
            restore()

        scope.restore = restore_and_end_launch
        return scope

    of_scalar = functools.cache(get_np_dtype)
    ORIGINALS.update(_patch_lang=patch_lang, _get_np_dtype=get_np_dtype)
    interpreter._patch_lang = patch_lang_once_per_launch
    interpreter._get_np_dtype = lambda t: of_scalar(t) if type(t) is tl.dtype else get_np_dtype(t)
    return True


@contextlib.contextmanager
def removed():
    """Triton's own functions back while inside (to compare results with and without the patch)."""
    from triton.runtime import interpreter

    ours = {name: getattr(interpreter, name) for name in ORIGINALS}
    try:
        for name, fn in ORIGINALS.items():
            setattr(interpreter, name, fn)
        yield
    finally:
        for name, fn in ours.items():
            setattr(interpreter, name, fn)
