"""distnn: data-parallel training on torch.distributed whose result equals one process.

The library API (README, "Library API"): ``setup`` joins the job, ``FlatGradSync`` sums
gradients across ranks through one flat buffer and applies the SGD update, ``shard_bounds``
says which rows of a batch are this rank's.
"""

from distnn.config import UsageError
from distnn.data import shard_bounds
from distnn.gradsync import FlatGradSync
from distnn.runtime import Runtime, setup

__version__ = "0.1.0"
__all__ = ["FlatGradSync", "Runtime", "UsageError", "setup", "shard_bounds", "__version__"]
