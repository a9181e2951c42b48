"""Model code nobody here wrote: Hugging Face transformers (tiny random-init configs, no download).

Each model runs in float64 against one backward per example (torch.func cannot run these
models' data-dependent code). Covered: broadcast position embeddings (GPT-2, BERT, RoBERTa,
DistilBERT), T5's relative attention bias (no batch dimension at all, also with the sequence
length equal to the batch size), GPT-2's Conv1D and tied head, Llama's RMSNorm and ViT's class
token and position embeddings (parameters used directly by modules without a rule),
ConvNeXt's channels-first LayerNorm and layer scale. B = 1 and B > 1. Then ALBERT, ELECTRA,
OPT, Mistral, Qwen2, Gemma, GPT-NeoX, Phi and BART with nothing written for them, and DeBERTa-v2,
whose encoder reads a child's weight directly, refused by name.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_engine_matches, loop_per_example_grads

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

V = 37  # vocabulary
DT = torch.float64


def _lm(model, ids):
    def losses(m, index):
        logits = m(input_ids=ids[index]).logits
        T = ids.shape[1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[index][:, 1:].reshape(-1),
                               reduction="none").view(-1, T - 1).sum(1)
    return losses


def _classify(ids, labels, **extra):
    def losses(m, index):
        kw = {k: v[index] for k, v in extra.items()}
        return F.cross_entropy(m(input_ids=ids[index], **kw).logits, labels[index], reduction="none")
    return losses


def _check(model, make_losses, B):
    model = model.to(DT)
    ref = loop_per_example_grads(model, make_losses, B)
    return assert_engine_matches(model, make_losses, ref, B)


def gpt2():
    cfg = tf.GPT2Config(vocab_size=V, n_embd=12, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


def bert(cls="BertForSequenceClassification", config="BertConfig", **kw):
    cfg = getattr(tf, config)(vocab_size=V, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              max_position_embeddings=24, num_labels=3, **kw)
    return getattr(tf, cls)(cfg)


def llama():
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=12, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return tf.LlamaForCausalLM(cfg)


class T5Classifier(nn.Module):
    """A T5 encoder (relative attention bias in its first layer) and a linear head."""

    def __init__(self):
        super().__init__()
        cfg = tf.T5Config(vocab_size=V, d_model=12, d_kv=6, d_ff=20, num_layers=2, num_heads=2, dropout_rate=0.0)
        self.encoder = tf.T5EncoderModel(cfg)
        self.head = nn.Linear(12, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h.mean(1))


@pytest.mark.parametrize("B,T", [(1, 5), (3, 6), (4, 4)])
def test_gpt2_tied_head_conv1d_broadcast_positions(B, T):
    ids = torch.randint(0, V, (B, T))
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    engine = _check(model, _lm(model, ids), B)
    assert engine.fallback_modules == []


@pytest.mark.parametrize("B,T", [(1, 5), (3, 7), (4, 4)])
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_bert_family_sequence_classification(arch, B, T):
    ids = torch.randint(1, V, (B, T))
    labels = torch.randint(0, 3, (B,))
    if arch == "bert":
        model = bert()
    elif arch == "roberta":
        model = bert("RobertaForSequenceClassification", "RobertaConfig", pad_token_id=0)
    else:
        cfg = tf.DistilBertConfig(vocab_size=V, dim=12, n_layers=2, n_heads=2, hidden_dim=20, dropout=0.0,
                                  attention_dropout=0.0, max_position_embeddings=24, num_labels=3,
                                  seq_classif_dropout=0.0)
        model = tf.DistilBertForSequenceClassification(cfg)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0  # padding in the first example
    engine = _check(model, _classify(ids, labels, attention_mask=mask), B)
    assert engine.fallback_modules == []


@pytest.mark.parametrize("B,T", [(1, 5), (3, 6)])
def test_llama_rmsnorm_followed_without_fallback(B, T):
    ids = torch.randint(0, V, (B, T))
    model = llama()
    engine = _check(model, _lm(model, ids), B)
    assert "model.norm" in engine.generic_modules and engine.fallback_modules == []


@pytest.mark.parametrize("B,T", [(1, 5), (3, 6), (4, 4), (3, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_t5_encoder_relative_attention_bias(B, T, masked):
    """The bias Embedding runs on [T, T] bucket ids: no batch dimension. T == B must not
    confuse it with a batched call."""
    ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, 3, (B,))
    model = T5Classifier()
    extra = {}
    if masked:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[-1, -1] = 0
        extra["attention_mask"] = mask
    engine = _check(model, _classify_plain(ids, labels, **extra), B)
    assert engine.fallback_modules == []


def _classify_plain(ids, labels, **extra):
    def losses(m, index):
        kw = {k: v[index] for k, v in extra.items()}
        return F.cross_entropy(m(ids[index], **kw), labels[index], reduction="none")
    return losses


@pytest.mark.parametrize("B", [1, 3])
def test_vit_class_token_and_position_embeddings(B):
    cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=12, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=20, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3)
    model = tf.ViTForImageClassification(cfg)
    pixels = torch.randn(B, 3, 8, 8, dtype=DT)
    labels = torch.randint(0, 3, (B,))

    def losses(m, index):
        return F.cross_entropy(m(pixel_values=pixels[index]).logits, labels[index], reduction="none")

    engine = _check(model, losses, B)
    assert "vit.embeddings" in engine.generic_modules and engine.fallback_modules == []


@pytest.mark.parametrize("B", [1, 3])
def test_convnext_channels_first_layernorm_and_layer_scale(B):
    cfg = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 12], depths=[1, 1], num_stages=2, num_labels=3,
                            image_size=16, drop_path_rate=0.0, layer_scale_init_value=0.5)
    model = tf.ConvNextForImageClassification(cfg)
    pixels = torch.randn(B, 3, 16, 16, dtype=DT)
    labels = torch.randint(0, 3, (B,))

    def losses(m, index):
        return F.cross_entropy(m(pixel_values=pixels[index]).logits, labels[index], reduction="none")

    engine = _check(model, losses, B)
    assert engine.fallback_modules == []


_DECODER = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=32)
_ENCODER = dict(_DECODER, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# Architectures beyond those above, each with its own embedding, attention and norm code: the
# engine must be exact on them without anything written for them.
MORE = {
    "albert": (lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(embedding_size=8, classifier_dropout_prob=0.0,
                                                                          **_ENCODER)), "classify"),
    "electra": (lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=8, **_ENCODER)), "classify"),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
                                                   num_attention_heads=2, max_position_embeddings=32, dropout=0.0,
                                                   attention_dropout=0.0, word_embed_proj_dim=16)), "lm"),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=1, **_DECODER)), "lm"),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=1, **_DECODER)), "lm"),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=1, head_dim=8, **_DECODER)), "lm"),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0,
                                                                **_DECODER)), "lm"),
    "phi": (lambda: tf.PhiForCausalLM(tf.PhiConfig(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                                                   **_DECODER)), "lm"),
}


@pytest.mark.parametrize("arch", sorted(MORE))
def test_more_architectures_exact(arch):
    B, T = 3, 6
    make, kind = MORE[arch]
    model = make()
    ids = torch.randint(3, V, (B, T))
    losses = _lm(model, ids) if kind == "lm" else _classify(ids, torch.randint(0, 3, (B,)))
    _check(model, losses, B)


def test_bart_encoder_decoder_classification():
    B, T = 3, 6
    cfg = tf.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                        dropout=0.0, attention_dropout=0.0, num_labels=3, pad_token_id=1, eos_token_id=2)
    ids = torch.randint(3, V, (B, T))
    ids[:, -1] = 2  # BART classifies from each sequence's final end-of-sequence token
    _check(tf.BartForSequenceClassification(cfg), _classify(ids, torch.randint(0, 3, (B,))), B)


def test_deberta_v2_parent_reading_a_child_weight_is_refused_by_name():
    """DeBERTa-v2's encoder reads ``rel_embeddings.weight`` directly (not by calling the
    Embedding): the engine cannot see that use, so it must refuse and name the parameter rather
    than give wrong per-example gradients."""
    import engm_fast

    cfg = tf.DebertaV2Config(relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], **_ENCODER)
    model = tf.DebertaV2ForSequenceClassification(cfg).to(DT)
    B, T = 3, 6
    ids = torch.randint(3, V, (B, T))
    losses = _classify(ids, torch.randint(0, 3, (B,)))
    engine = engm_fast.attach(model)
    try:
        with pytest.raises(NotImplementedError, match=r"deberta\.encoder\.rel_embeddings\.weight.*not recorded"):
            engine.backward(losses(model, slice(0, B)))
    finally:
        engm_fast.release(model)
