"""BERT-large as MLPerf Training pretrains it (Wikipedia, masked LM + NSP).

Structure, per the MLPerf reference (language_model/tensorflow/bert, the
original BERT modeling code) and its bert_config.json: 24 post-LN transformer
layers, hidden 1024, 16 heads of 64, feed-forward 4096 with GELU (the tanh
form, as the reference's modeling code computes it), vocabulary 30522, 512
positions, 2 token types, layer-norm epsilon 1e-12, dropout 0.1 on hidden
states and attention probabilities. Heads: the pooler (dense + tanh on the
[CLS] token), the masked-LM head (dense + GELU + layer norm, then the decoder
tied to the word embeddings plus its own output bias) and the next-sentence
head (dense to 2). With this config the model has 336,226,108 parameters,
as HF transformers' BertForPreTraining counts them.

Initialisation as the reference: every dense kernel and embedding truncated
normal with stddev 0.02 (cut at two standard deviations), biases zero,
layer-norm scale one and bias zero.

Inputs are in the general "packed" form: a row holds up to K sequences.
`sequence_ids` says which sequence each token belongs to (1..K, 0 for
padding) and tokens attend only within their own sequence; `position_ids`
restart at 0 for every sequence; the masked-LM head runs only at
`masked_lm_positions`, and the pooler and NSP head at each sequence's [CLS]
token (`next_sentence_positions`). An unpacked example is the K = 1 case
(sequence_ids = input_mask, position_ids = 0..S-1, next_sentence_positions =
[0]).

Every parameter carries logical axis names (`nn.with_logical_partitioning`:
vocab, embed, heads, kv, mlp, ...), and `shard(x, names)` is called on the key
activations with names (batch, length, act_embed, act_heads, act_mlp, ...); the
workload maps both onto the mesh (data, fsdp, tensor).

Attention is jax.nn.dot_product_attention (cuDNN's fused kernel on GPU when
`attention_impl='cudnn'`, XLA otherwise) with a boolean mask built from the
sequence ids. Dropout on attention probabilities is not something that API
offers, so while training with `attention_dropout > 0` the attention is
written out (softmax, dropout, weighted sum) and left to XLA to fuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Names = Sequence[str | None]
ShardFn = Callable[[jax.Array, Names], jax.Array]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  gelu_approximate: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of '
                       f'num_heads {self.num_heads}')


LARGE = BertConfig()


def param_count(cfg: BertConfig) -> int:
  """Parameters of BertForPreTraining by formula (tied decoder counted once)."""
  h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  embeddings = (v + cfg.max_position + cfg.type_vocab_size) * h + 2 * h
  layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
  pooler = h * h + h
  mlm = h * h + h + 2 * h + v
  nsp = 2 * h + 2
  return embeddings + cfg.num_layers * layer + pooler + mlm + nsp


def _no_shard(x, names):
  del names
  return x


def _init(cfg: BertConfig, names: Names):
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(cfg.initializer_range), names)


def _zeros(names: Names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: Names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _layer_norm(cfg: BertConfig, dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype,
                      param_dtype=jnp.float32, name=name,
                      scale_init=_ones(('norm',)), bias_init=_zeros(('norm',)))


def gelu(x, approximate: bool):
  return jax.nn.gelu(x, approximate=approximate)


def attention_mask(sequence_ids: jax.Array) -> jax.Array:
  """[B, 1, S, S] bool: a token attends to the tokens of its own sequence.

  Padding queries (id 0) attend to every real token, so an unpacked row
  masks exactly the padded keys, as BERT's input_mask does.
  """
  q = sequence_ids[:, None, :, None]
  k = sequence_ids[:, None, None, :]
  return ((q == k) | (q == 0)) & (k > 0)


class SelfAttention(nn.Module):
  cfg: BertConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  shard: ShardFn = _no_shard

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    n, d = cfg.num_heads, cfg.head_dim

    def proj(name):
      y = nn.DenseGeneral((n, d), dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=_init(cfg, ('embed', 'heads', 'kv')),
                          bias_init=_zeros(('heads', 'kv')), name=name)(x)
      return self.shard(y, ('batch', 'length', 'act_heads', None))

    q, k, v = proj('query'), proj('key'), proj('value')
    if not deterministic and cfg.attention_dropout > 0:
      logits = jnp.einsum('bqnd,bknd->bnqk', q, k,
                          preferred_element_type=jnp.float32) / d ** 0.5
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=False)
      ctx = jnp.einsum('bnqk,bknd->bqnd', probs.astype(self.dtype), v)
    else:
      ctx = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         implementation=self.attention_impl)
    ctx = self.shard(ctx, ('batch', 'length', 'act_heads', None))
    out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=self.dtype,
                          param_dtype=jnp.float32,
                          kernel_init=_init(cfg, ('heads', 'kv', 'embed')),
                          bias_init=_zeros(('embed',)), name='out')(ctx)
    return self.shard(out, ('batch', 'length', 'act_embed'))


class Layer(nn.Module):
  """One post-LN transformer layer."""
  cfg: BertConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  shard: ShardFn = _no_shard

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    drop = nn.Dropout(cfg.hidden_dropout)
    y = SelfAttention(cfg, self.dtype, self.attention_impl, self.shard,
                      name='attention')(x, mask, deterministic)
    y = drop(y, deterministic=deterministic)
    x = _layer_norm(cfg, self.dtype, 'attention_layer_norm')(x + y)
    x = self.shard(x, ('batch', 'length', 'act_embed'))
    y = nn.Dense(cfg.intermediate_size, dtype=self.dtype,
                 param_dtype=jnp.float32,
                 kernel_init=_init(cfg, ('embed', 'mlp')),
                 bias_init=_zeros(('mlp',)), name='intermediate')(x)
    y = self.shard(gelu(y, cfg.gelu_approximate), ('batch', 'length', 'act_mlp'))
    y = nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_init(cfg, ('mlp', 'embed')),
                 bias_init=_zeros(('embed',)), name='output')(y)
    y = drop(y, deterministic=deterministic)
    x = _layer_norm(cfg, self.dtype, 'output_layer_norm')(x + y)
    return self.shard(x, ('batch', 'length', 'act_embed'))


class Embeddings(nn.Module):
  cfg: BertConfig
  dtype: Dtype = jnp.float32
  shard: ShardFn = _no_shard

  @nn.compact
  def __call__(self, input_ids, segment_ids, position_ids, deterministic: bool):
    cfg = self.cfg

    def embed(name, num, names):
      return nn.Embed(num, cfg.hidden_size, dtype=self.dtype,
                      param_dtype=jnp.float32,
                      embedding_init=_init(cfg, names), name=name)

    word = embed('word_embeddings', cfg.vocab_size, ('vocab', 'embed'))
    x = (word(input_ids)
         + embed('position_embeddings', cfg.max_position,
                 (None, 'embed'))(position_ids)
         + embed('token_type_embeddings', cfg.type_vocab_size,
                 (None, 'embed'))(segment_ids))
    x = _layer_norm(cfg, self.dtype, 'layer_norm')(x)
    x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return self.shard(x, ('batch', 'length', 'act_embed')), word.embedding


class BertModel(nn.Module):
  """Embeddings and encoder; returns (sequence output, word embedding table)."""
  cfg: BertConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  shard: ShardFn = _no_shard

  @nn.compact
  def __call__(self, input_ids, segment_ids, sequence_ids, position_ids,
               deterministic: bool = True):
    cfg = self.cfg
    embeddings = Embeddings(cfg, self.dtype, self.shard, name='embeddings')
    x, table = embeddings(input_ids, segment_ids, position_ids, deterministic)
    mask = attention_mask(sequence_ids)
    for i in range(cfg.num_layers):
      x = Layer(cfg, self.dtype, self.attention_impl, self.shard,
                name=f'encoder_layer_{i}')(x, mask, deterministic)
    return x, table


class BertForPreTraining(nn.Module):
  """Masked-LM and next-sentence logits.

  __call__(input_ids, segment_ids, sequence_ids, position_ids,
           masked_lm_positions, next_sentence_positions, deterministic)
    -> (mlm_logits [B, P, vocab] float32, nsp_logits [B, K, 2] float32)
  """
  cfg: BertConfig = LARGE
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  shard: ShardFn = _no_shard

  @nn.compact
  def __call__(self, input_ids, segment_ids, sequence_ids, position_ids,
               masked_lm_positions, next_sentence_positions,
               deterministic: bool = True):
    cfg = self.cfg
    bert = BertModel(cfg, self.dtype, self.attention_impl, self.shard,
                     name='bert')
    x, table = bert(input_ids, segment_ids, sequence_ids, position_ids,
                    deterministic)

    # Pooler and NSP head at each sequence's [CLS] token.
    cls_tokens = jnp.take_along_axis(x, next_sentence_positions[..., None],
                                     axis=1)
    pooled = nn.Dense(cfg.hidden_size, dtype=self.dtype,
                      param_dtype=jnp.float32,
                      kernel_init=_init(cfg, ('embed', 'embed_out')),
                      bias_init=_zeros(('embed_out',)), name='pooler')(cls_tokens)
    pooled = jnp.tanh(pooled)
    nsp = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_init(cfg, ('embed', None)),
                   bias_init=_zeros((None,)), name='nsp')(pooled)

    # Masked-LM head, only at the masked positions.
    h = jnp.take_along_axis(x, masked_lm_positions[..., None], axis=1)
    h = nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_init(cfg, ('embed', 'embed_out')),
                 bias_init=_zeros(('embed_out',)), name='mlm_transform')(h)
    h = gelu(h, cfg.gelu_approximate)
    h = _layer_norm(cfg, self.dtype, 'mlm_layer_norm')(h)
    logits = jnp.einsum('bph,vh->bpv', h.astype(self.dtype),
                        table.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    bias = self.param('mlm_output_bias', _zeros(('vocab',)),
                      (cfg.vocab_size,), jnp.float32)
    logits = self.shard(logits + bias, ('batch', None, 'act_vocab'))
    return logits, nsp.astype(jnp.float32)
