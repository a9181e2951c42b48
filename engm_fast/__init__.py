"""engm_fast: fast per-example gradient norms and reweighted gradients for robust training.

Public API:
  * :func:`per_example_grad_norms` ``(model, losses) -> [B]``
  * :class:`ENGM`: example-normalized SGD with momentum (``opt.backward(losses); opt.step()``)
  * :func:`attach` / :func:`release`: the one-backward per-example engine of a model
  * :mod:`engm_fast.ops`: the ``per_example_sqnorm``, ``weighted_outer_sum`` and
    ``sgd_momentum_update_`` ops
  * :func:`available_backends`, :func:`use_backend`: which implementation of the ops runs
"""
from ._backend import available_backends, current_backend, native_import_error, use_backend
from . import ops, reference
from .engine import PerExampleEngine, attach, engine_of, release
from .norms import per_example_grad_norms
from .optim import ENGM
from . import at  # noqa: E402  (attacks use the engine)
from . import regularizers

__version__ = "0.1.0"

__all__ = [
    "ENGM",
    "PerExampleEngine",
    "at",
    "attach",
    "available_backends",
    "current_backend",
    "engine_of",
    "native_import_error",
    "ops",
    "per_example_grad_norms",
    "reference",
    "regularizers",
    "release",
    "use_backend",
]
