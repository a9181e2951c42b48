"""Function-space regularizers: the k-th order total variation penalty (Okuno, arXiv 2308.02293)."""
from .ktv import ktv_penalty

__all__ = ["ktv_penalty"]
