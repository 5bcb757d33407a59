"""fastntm: Neural Turing Machines, exact to the paper, fast on GPU and CPU."""

from . import functional

__all__ = ["functional"]
__version__ = "0.1.0"
