"""Without a GPU, run the Triton kernels through the interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so it is set here,
before any test imports fastntm. ``backend="auto"`` still takes the numba
kernels for CPU tensors; Triton kernel tests ask for ``backend="triton"``.
Under the interpreter, ``interpreter_patch`` makes it skip work it has
already done (a third of the kernel tests' time), with the same results.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_patch import install

    install()

# One intra-op thread for the tests' own ops (they are small): the static checks' compiles run beside them on the
# other core, where a second torch thread would spin between ops (tests/test_distributed.py set one thread for
# every test after it already). OMP_NUM_THREADS too, for the processes tests start and for ``fastntm.cli``'s
# default ``--threads``, which ``main`` sets.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


STATIC_CHECKS = "test_static_checks_pass_with_the_interpreter_off"


def _static_checks_module(session):
    return next((item.module for item in session.items if item.name == STATIC_CHECKS), None)


def pytest_collection_modifyitems(session, config, items):
    """The static checks' test last: it waits for their subprocess, which the other tests run beside."""
    items.sort(key=lambda item: item.name == STATIC_CHECKS)


def pytest_collection_finish(session):
    """Start the static kernel checks' subprocess (``tests/test_kernels_static.py``) once it is known to be
    selected: it compiles on both cores for minutes, and runs beside the interpreter tests, not after them."""
    module = _static_checks_module(session)
    if module is not None and not session.config.option.collectonly:
        module.start_in_background()


def pytest_sessionfinish(session):
    module = _static_checks_module(session)
    if module is not None:
        module.stop_in_background()
