"""The benchmark models, at the sizes the comparison with the peers uses.

* :func:`mlp`: 784-512-512-10 with ReLU (``[B, 784]`` inputs).
* :func:`cnn32`: two 3x3 conv layers + two linear layers for ``[B, 3, 32, 32]``.
* :func:`resnet18`: ResNet-18 for CIFAR shapes (3x3 stem, no max-pool, He et al. 2016's
  BasicBlocks [2, 2, 2, 2]), with ``norm="batch"`` or ``norm="group"`` (GroupNorm with 32
  groups, the variant that per-example methods which cannot handle BatchNorm can run).
  ``width`` scales the channels (64 at full size) so tests can use a tiny copy.
* :class:`PreLNMLPBlock`: embedding, LayerNorm and a residual MLP on ``[B, T, 32]`` sequences,
  mean-pooled (a LayerNorm model without attention, for the step-overhead benchmark).
* :class:`TransformerBlock`: a pre-LN encoder block on token sequences, attention written with
  ``nn.Linear`` projections and ``F.scaled_dot_product_attention`` (the shape of most modern
  implementations; every peer that supports Linear, LayerNorm and Embedding can run it).

Model code nobody here wrote (the real-model cases; transformers is imported when one is built):

* :func:`gpt2_lm`, :func:`llama_lm`: ``GPT2LMHeadModel`` (tied head, Conv1D, broadcast position
  embeddings) and ``LlamaForCausalLM`` (RMSNorm, rotary embeddings) with a next-token loss summed
  over each sequence (:func:`sequence_loss`);
* :func:`bert_classifier`, :func:`vit_classifier`, :func:`convnext_classifier`:
  ``BertForSequenceClassification``, ``ViTForImageClassification`` (class token, position
  embeddings), ``ConvNextForImageClassification`` (channels-first LayerNorm, layer scale);
* :func:`recurrent_classifier` (:func:`lstm_classifier`): Embedding, ``nn.LSTM`` / ``nn.GRU`` /
  ``nn.RNN``, Linear on the last hidden state;
* :func:`encoder_layer_classifier`: Embedding, ``nn.TransformerEncoderLayer`` (its
  ``nn.MultiheadAttention``), mean-pooled Linear.

A model whose loss is not the cross-entropy of ``[B, classes]`` logits has a
``per_example_loss(output, target) -> [B]`` method (:func:`per_example_loss` finds it).

Example::

    >>> import torch
    >>> from engm_fast.bench.models import resnet18, TransformerBlock
    >>> resnet18(norm="group", width=8)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> TransformerBlock(vocab=50, d=16, heads=2)(torch.zeros(2, 7, dtype=torch.long)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMS", "PreLNMLPBlock", "TransformerBlock", "bert_classifier", "cnn32", "convnext_classifier",
           "encoder_layer_classifier", "gpt2_lm", "llama_lm", "lstm_classifier", "mlp", "per_example_loss",
           "recurrent_classifier", "resnet18", "sequence_loss", "vit_classifier"]

NORMS = ("batch", "group")


def mlp(d_in: int = 784, hidden: int = 512, classes: int = 10) -> nn.Module:
    """784-512-512-10 MLP with ReLU.

    Example::

        >>> mlp()(torch.zeros(3, 784)).shape
        torch.Size([3, 10])
    """
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def cnn32(channels: int = 3, classes: int = 10) -> nn.Module:
    """Small CNN for 32x32 images: conv32-pool-conv64-pool-fc128-fc10.

    Example::

        >>> cnn32()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    # 32 groups as in Wu & He (2018); fewer when a tiny test model has fewer channels.
    return nn.GroupNorm(min(32, channels), channels)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.n1 = _norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.n2 = _norm_layer(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm_layer(norm, c_out))

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet18(nn.Module):
    def __init__(self, norm: str, width: int, classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.n0 = _norm_layer(norm, width)
        layers, c = [], width
        for i, blocks in enumerate((2, 2, 2, 2)):
            c_out = width * 2 ** i
            for b in range(blocks):
                layers.append(_BasicBlock(c, c_out, 2 if (b == 0 and i > 0) else 1, norm))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        out = self.layers(F.relu(self.n0(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(norm: str = "group", width: int = 64, classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 inputs (11.2M parameters at ``width=64``).

    Args:
        norm: ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm, 32 groups).
        width: channels of the first stage (64 in the paper); later stages double it.
        classes: outputs.

    Example::

        >>> sum(p.numel() for p in resnet18(norm="batch").parameters())
        11173962
    """
    if norm not in NORMS:
        raise ValueError(f"resnet18: norm must be one of {NORMS}, got {norm!r}")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"resnet18: width must be an int >= 1, got {width!r}")
    return _ResNet18(norm, width, classes)


class PreLNMLPBlock(nn.Module):
    """``x -> h = Linear(x) -> h + fc2(gelu(fc1(LN(h)))) -> mean over T -> head``, inputs ``[B, T, d_in]``.

    Example::

        >>> PreLNMLPBlock(d_in=8, d=16)(torch.zeros(2, 5, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, d_in: int = 32, d: int = 128, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


class TransformerBlock(nn.Module):
    """Token embedding, one pre-LN transformer encoder block, mean-pooled linear classifier.

    ``x -> emb -> x + Wo·attn(LN(x)) -> x + W2·gelu(W1·LN(x)) -> mean over T -> head``, with
    ``heads`` attention heads and a 4x MLP. Inputs are ``[B, T]`` token ids.

    Example::

        >>> block = TransformerBlock(vocab=100, d=32, heads=4)
        >>> block(torch.randint(0, 100, (2, 5))).shape
        torch.Size([2, 10])
    """

    def __init__(self, vocab: int = 1000, d: int = 256, heads: int = 4, classes: int = 10):
        super().__init__()
        if d % heads:
            raise ValueError(f"TransformerBlock: d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.out(att)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def per_example_loss(model: nn.Module):
    """The bench loss of ``model``: ``(output, target) -> [B]``; cross-entropy unless the model
    defines ``per_example_loss``.

    Example::

        >>> loss = per_example_loss(mlp(4, 8, 3))
        >>> loss(torch.zeros(2, 3), torch.tensor([0, 2])).shape
        torch.Size([2])
    """
    own = getattr(model, "per_example_loss", None)
    return own if callable(own) else (lambda out, y: F.cross_entropy(out, y, reduction="none"))


def sequence_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over each sequence: ``[B, T, V]`` logits of ``[B, T]``
    tokens -> ``[B]``.

    Example::

        >>> sequence_loss(torch.zeros(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)).shape
        torch.Size([2])
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1),
                           reduction="none").view(B, T - 1).sum(1)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # the bench reports the case as one it cannot run
        raise ImportError("the real-model cases need transformers: pip install transformers") from exc
    transformers.logging.set_verbosity_error()
    return transformers


class _Logits(nn.Module):
    """A transformers model called on one tensor, returning its ``.logits``."""

    def __init__(self, model: nn.Module, key: str, lm: bool):
        super().__init__()
        self.model, self.key, self.lm = model, key, lm

    def forward(self, x):
        return self.model(**{self.key: x}).logits

    def per_example_loss(self, out, y):
        return sequence_loss(out, y) if self.lm else F.cross_entropy(out, y, reduction="none")


def gpt2_lm(d: int = 256, layers: int = 2, heads: int = 4, vocab: int = 1000, positions: int = 64) -> nn.Module:
    """``GPT2LMHeadModel`` (random init, no dropout) on ``[B, T]`` tokens; loss :func:`sequence_loss`."""
    tf = _transformers()
    cfg = tf.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return _Logits(tf.GPT2LMHeadModel(cfg), "input_ids", lm=True)


def llama_lm(d: int = 256, layers: int = 2, heads: int = 4, vocab: int = 1000, positions: int = 64) -> nn.Module:
    """``LlamaForCausalLM`` (random init, grouped-query attention with half the heads for keys
    and values, MLP 4x) on ``[B, T]`` tokens; loss :func:`sequence_loss`."""
    tf = _transformers()
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=positions)
    return _Logits(tf.LlamaForCausalLM(cfg), "input_ids", lm=True)


def bert_classifier(d: int = 256, layers: int = 2, heads: int = 4, vocab: int = 1000, classes: int = 10,
                    positions: int = 64) -> nn.Module:
    """``BertForSequenceClassification`` (random init, no dropout) on ``[B, T]`` tokens."""
    tf = _transformers()
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * d, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=positions, num_labels=classes)
    return _Logits(tf.BertForSequenceClassification(cfg), "input_ids", lm=False)


def vit_classifier(d: int = 256, layers: int = 2, heads: int = 4, image: int = 32, patch: int = 4,
                   classes: int = 10) -> nn.Module:
    """``ViTForImageClassification`` on ``[B, 3, image, image]`` (``(image/patch)^2 + 1`` tokens)."""
    tf = _transformers()
    cfg = tf.ViTConfig(image_size=image, patch_size=patch, num_channels=3, hidden_size=d, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * d, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=classes)
    return _Logits(tf.ViTForImageClassification(cfg), "pixel_values", lm=False)


def convnext_classifier(widths=(64, 128), depths=(1, 1), image: int = 32, classes: int = 10) -> nn.Module:
    """``ConvNextForImageClassification`` on ``[B, 3, image, image]``: 7x7 depthwise convs,
    channels-first LayerNorm in the stem and downsampling, layer scale."""
    tf = _transformers()
    cfg = tf.ConvNextConfig(num_channels=3, hidden_sizes=list(widths), depths=list(depths), num_stages=len(widths),
                            num_labels=classes, image_size=image, drop_path_rate=0.0)
    return _Logits(tf.ConvNextForImageClassification(cfg), "pixel_values", lm=False)


class _RecurrentClassifier(nn.Module):
    def __init__(self, cell, vocab, d, layers, classes):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = getattr(nn, cell)(d, d, num_layers=layers, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        _, h = self.rnn(self.emb(tokens))
        h = h[0] if isinstance(h, tuple) else h   # LSTM: (h_n, c_n)
        return self.head(h[-1])


def recurrent_classifier(cell: str = "LSTM", vocab: int = 1000, d: int = 256, layers: int = 1,
                         classes: int = 10) -> nn.Module:
    """Embedding, ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (``cell``, batch first), Linear on the last
    layer's final hidden state.

    Example::

        >>> recurrent_classifier("GRU", 50, 16)(torch.zeros(2, 7, dtype=torch.long)).shape
        torch.Size([2, 10])
    """
    if cell not in ("LSTM", "GRU", "RNN"):
        raise ValueError(f"recurrent_classifier: cell must be 'LSTM', 'GRU' or 'RNN', got {cell!r}")
    return _RecurrentClassifier(cell, vocab, d, layers, classes)


def lstm_classifier(vocab: int = 1000, d: int = 256, layers: int = 1, classes: int = 10) -> nn.Module:
    """:func:`recurrent_classifier` with ``nn.LSTM``.

    Example::

        >>> lstm_classifier(50, 16)(torch.zeros(2, 7, dtype=torch.long)).shape
        torch.Size([2, 10])
    """
    return recurrent_classifier("LSTM", vocab, d, layers, classes)


class _EncoderClassifier(nn.Module):
    def __init__(self, vocab, d, heads, classes, batch_first):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, classes)
        self.batch_first = batch_first

    def forward(self, tokens):
        h = self.emb(tokens if self.batch_first else tokens.t())
        h = self.layer(h)
        return self.head(h.mean(1 if self.batch_first else 0))


def encoder_layer_classifier(vocab: int = 1000, d: int = 256, heads: int = 4, classes: int = 10,
                             batch_first: bool = True) -> nn.Module:
    """Embedding, one ``nn.TransformerEncoderLayer`` (no dropout), mean-pooled Linear.

    Example::

        >>> encoder_layer_classifier(50, 16, 2)(torch.zeros(2, 7, dtype=torch.long)).shape
        torch.Size([2, 10])
    """
    return _EncoderClassifier(vocab, d, heads, classes, batch_first)
