"""The built-in layer rules, one file per layer family, each registered through the same
public registry users extend (:func:`engm_fast.register_rule`).

* :mod:`.linear`: ``nn.Linear``, transformers' ``Conv1D``, ``F.linear``
* :mod:`.conv`: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``F.conv*``
* :mod:`.embedding`: ``nn.Embedding``, ``F.embedding``
* :mod:`.norms`: LayerNorm, GroupNorm, RMSNorm, BatchNorm1d/2d/3d and their functionals
* :mod:`.recurrent`: ``nn.RNN/LSTM/GRU`` and their cells (replaced forwards)
* :mod:`.attention`: ``nn.MultiheadAttention`` (replaced forward)
"""
from . import attention, conv, embedding, linear, norms, recurrent  # noqa: F401
