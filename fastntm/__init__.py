"""fastntm: Neural Turing Machines, exact to the paper, fast on GPU and CPU."""

from . import functional
from .model import FastNTM, NTMCell, NTMState

__all__ = ["FastNTM", "NTMCell", "NTMState", "functional"]
__version__ = "0.1.0"
