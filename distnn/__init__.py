"""distnn: data-parallel training on torch.distributed whose result equals one process.

The library API (docs/library-api.md): ``fit`` runs the whole training run (mini-batches,
checkpoints, resume, preemption, the guards, metrics, validation) for your own model, loss,
optimizer and data. Its pieces, for a loop of your own: ``setup`` joins the job,
``FlatGradSync`` sums gradients across ranks through one flat buffer and applies the SGD
update, ``shard_bounds`` says which rows of a batch are this rank's.
"""

# first: it notes the parent process before the imports below (torch's) take seconds
from distnn import _launched  # noqa: F401
from distnn._version import __version__
from distnn.data.shards import shard_bounds
from distnn.distributed.gradsync import FlatGradSync
from distnn.distributed.runtime import Runtime, setup
from distnn.errors import RunFailed, UsageError
from distnn.fit import fit
from distnn.trainer import TrainResult

__all__ = ["FlatGradSync", "RunFailed", "Runtime", "TrainResult", "UsageError", "fit", "setup",
           "shard_bounds", "__version__"]
