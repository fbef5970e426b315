"""The MLPerf DLRM in PyTorch, with the reference's module and tensor names.

Follows DLRM_Net of facebookresearch/dlrm (branch mlperf, dlrm_s_pytorch.py)
as MLPerf Training v2.1 runs it: dot interaction without self-interaction,
one nn.EmbeddingBag(mode='sum') per categorical feature, MLPs as
nn.Sequential of Linear and activation modules, a sigmoid after the top MLP
and no output clamping (loss_threshold 0). The same modules are registered
in the same order, so the state_dict has the reference's keys and shapes:

    emb_l.{t}.weight                     table t, [rows_t, embed_dim]
    bot_l.{0,2,4}.{weight,bias}          Linear (out, in); ReLU at 1, 3, 5
    top_l.{0,2,4,6,8}.{weight,bias}      Linear; ReLU at 1, 3, 5, 7, and
                                         the Sigmoid at 9

Initialisation as the reference's create_mlp and create_emb: a Linear n -> m
has weight N(0, sqrt(2 / (m + n))) and bias N(0, sqrt(1 / m)); a table of n
rows is uniform in [-sqrt(1 / n), sqrt(1 / n)). By default the values come
from torch's generator (a given torch.manual_seed draws the same weights);
given `init_rng`, a numpy RandomState, they come from it with the
reference's calls in the reference's order (tables, bottom MLP, top MLP; per
Linear the weight, then the bias; float64 draws cast to float32), so a
RandomState in the state of the reference's global numpy generator when it
builds DLRM_Net gives the reference's initial weights.

Each sample has one index per table (Criteo), so every bag holds one row:
the offsets are arange(batch), as the reference's MLPerf data loader builds
them. jaxperf.compare and the parity tests use this module;
jaxperf.interop maps its state_dict to models/dlrm.py (DenseArch and the
tables).

Input: dense [B, num_dense] float, sparse [B, num_tables] int64 indices;
forward returns click probabilities [B], `logits` the values before the
sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

BOTTOM_MLP = (512, 256, 128)
TOP_MLP = (1024, 1024, 512, 256, 1)


def interaction_pairs(n: int) -> tuple[list[int], list[int]]:
  """(i, j) with i > j of n vectors, row by row: (1,0), (2,0), (2,1), ..."""
  li = [i for i in range(n) for _ in range(i)]
  lj = [j for i in range(n) for j in range(i)]
  return li, lj


class DLRM(nn.Module):
  """The reference DLRM_Net (arch_interaction_op='dot', one device).

  Args:
    table_sizes: rows of each embedding table, in feature order.
    embed_dim: embedding width; also the bottom MLP's output width.
    bottom: the bottom MLP's widths after the dense input.
    top: the top MLP's widths after the interaction; ends in 1.
    num_dense: dense features.
    sparse: EmbeddingBag(sparse=True), the reference's: the tables get
      sparse gradients (torch.optim.SGD applies them).
    init_rng: a numpy RandomState to draw the initial weights from as the
      reference does (see the module docstring); None: torch's generator.
  """

  def __init__(self, table_sizes: Sequence[int], embed_dim: int = 128,
               bottom: Sequence[int] = BOTTOM_MLP,
               top: Sequence[int] = TOP_MLP, num_dense: int = 13,
               sparse: bool = True,
               init_rng: np.random.RandomState | None = None):
    super().__init__()
    table_sizes = [int(n) for n in table_sizes]
    bottom, top = [int(w) for w in bottom], [int(w) for w in top]
    if not table_sizes or min(table_sizes) < 1:
      raise ValueError(f'table_sizes {table_sizes}: expected one or more '
                       f'positive row counts')
    if not bottom or bottom[-1] != embed_dim:
      raise ValueError(f'the bottom MLP {bottom} must end in embed_dim '
                       f'({embed_dim})')
    if not top or top[-1] != 1:
      raise ValueError(f'the top MLP {top} must end in 1')
    self.embed_dim = int(embed_dim)
    self.table_sizes = table_sizes
    n = len(table_sizes) + 1
    self.interaction_dim = embed_dim + n * (n - 1) // 2
    li, lj = interaction_pairs(n)
    self.register_buffer('li', torch.tensor(li, dtype=torch.long),
                         persistent=False)
    self.register_buffer('lj', torch.tensor(lj, dtype=torch.long),
                         persistent=False)
    # Each table gets its initial values below; empty storage avoids the
    # default N(0, 1) fill of a possibly large table.
    self.emb_l = nn.ModuleList([
        nn.EmbeddingBag(rows, embed_dim, mode='sum', sparse=sparse,
                        _weight=torch.empty(rows, embed_dim))
        for rows in table_sizes])
    self.bot_l = _mlp([num_dense] + bottom, sigmoid=False)
    self.top_l = _mlp([self.interaction_dim] + top, sigmoid=True)
    self._init_weights(init_rng)

  @torch.no_grad()
  def _init_weights(self, rng: np.random.RandomState | None):
    for emb in self.emb_l:
      rows, dim = emb.weight.shape
      bound = float(np.sqrt(1.0 / rows))
      if rng is None:
        emb.weight.uniform_(-bound, bound)
      else:
        emb.weight.copy_(torch.from_numpy(
            rng.uniform(-bound, bound, (rows, dim)).astype(np.float32)))
    for mlp in (self.bot_l, self.top_l):
      for layer in mlp:
        if not isinstance(layer, nn.Linear):
          continue
        m, n = layer.weight.shape
        w_std, b_std = float(np.sqrt(2.0 / (m + n))), float(np.sqrt(1.0 / m))
        if rng is None:
          layer.weight.normal_(0.0, w_std)
          layer.bias.normal_(0.0, b_std)
        else:
          layer.weight.copy_(torch.from_numpy(
              rng.normal(0.0, w_std, (m, n)).astype(np.float32)))
          layer.bias.copy_(torch.from_numpy(
              rng.normal(0.0, b_std, m).astype(np.float32)))

  def embeddings(self, sparse: torch.Tensor) -> list[torch.Tensor]:
    """[B, num_tables] indices -> one [B, embed_dim] row per table."""
    if sparse.dim() != 2 or sparse.shape[1] != len(self.emb_l):
      raise ValueError(f'sparse indices of shape {tuple(sparse.shape)}: '
                       f'expected [batch, {len(self.emb_l)}]')
    sparse = sparse.long()
    offsets = torch.arange(sparse.shape[0], device=sparse.device)
    return [emb(sparse[:, t].contiguous(), offsets)
            for t, emb in enumerate(self.emb_l)]

  def interact(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
    """The dot interaction: x, then the products of pairs i > j."""
    b, d = x.shape
    t = torch.cat([x] + ly, dim=1).view(b, -1, d)
    z = torch.bmm(t, torch.transpose(t, 1, 2))
    return torch.cat([x, z[:, self.li, self.lj]], dim=1)

  def logits(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Click logits [B]: the top MLP's output before its sigmoid."""
    x = self.bot_l(dense)
    r = self.interact(x, self.embeddings(sparse))
    return self.top_l[:-1](r)[:, 0]

  def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Click probabilities [B], as the reference returns them."""
    return self.top_l[-1](self.logits(dense, sparse))


def _mlp(widths: Sequence[int], sigmoid: bool) -> nn.Sequential:
  """Linear and ReLU in turn; the last activation a Sigmoid if asked."""
  layers = []
  for i, (n, m) in enumerate(zip(widths[:-1], widths[1:])):
    layers.append(nn.Linear(n, m, bias=True))
    last = i == len(widths) - 2
    layers.append(nn.Sigmoid() if sigmoid and last else nn.ReLU())
  return nn.Sequential(*layers)


def bce_loss(probabilities: torch.Tensor, labels: torch.Tensor
             ) -> torch.Tensor:
  """The reference's loss: torch.nn.BCELoss(reduction='mean')."""
  return nn.functional.binary_cross_entropy(
      probabilities, labels.to(probabilities.dtype))
