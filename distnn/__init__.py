"""distnn: data-parallel training on torch.distributed whose result equals one process."""

__version__ = "0.1.0"
