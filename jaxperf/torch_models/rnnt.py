"""The MLPerf reference RNN-T in PyTorch (rnn_speech_recognition/pytorch:
rnnt/model.py, common/rnn.py), with its structure, state_dict names and
initialisation, without its logging; for parity tests and jaxperf.compare.

Names: encoder.pre_rnn.lstm.*, encoder.post_rnn.lstm.* (torch.nn.LSTM's
weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}),
prediction.embed.weight, prediction.dec_rnn.lstm.*, joint_pred.*,
joint_enc.*, joint_net.2.* (Sequential(ReLU, Dropout, Linear)).
"""

from __future__ import annotations

import torch
from torch import nn


class LSTM(nn.Module):
  """common/rnn.LSTM: torch.nn.LSTM with the forget-gate bias set, the
  hidden forget bias scaled and every tensor scaled, dropout after it."""

  def __init__(self, input_size, hidden_size, num_layers, dropout,
               forget_gate_bias=1.0, weights_init_scale=1.0,
               hidden_hidden_bias_scale=0.0):
    super().__init__()
    self.lstm = nn.LSTM(input_size=input_size, hidden_size=hidden_size,
                        num_layers=num_layers, dropout=dropout)
    self.dropout = nn.Dropout(dropout) if dropout else None
    if forget_gate_bias is not None:
      for name, _ in self.lstm.named_parameters():
        bias = getattr(self.lstm, name)
        if 'bias_ih' in name:
          bias.data[hidden_size:2 * hidden_size].fill_(forget_gate_bias)
        if 'bias_hh' in name:
          bias.data[hidden_size:2 * hidden_size] *= float(
              hidden_hidden_bias_scale)
    for name, v in self.named_parameters():
      if 'weight' in name or 'bias' in name:
        v.data *= float(weights_init_scale)

  def forward(self, x, h=None):
    x, h = self.lstm(x, h)
    if self.dropout:
      x = self.dropout(x)
    return x, h


class StackTime(nn.Module):

  def __init__(self, factor):
    super().__init__()
    self.factor = int(factor)

  def forward(self, x, x_lens):                 # x: (T, B, F)
    seq = [x]
    for i in range(1, self.factor):
      tmp = torch.zeros_like(x)
      tmp[:-i] = x[i:]
      seq.append(tmp)
    x_lens = (x_lens.int() + self.factor - 1) // self.factor
    return torch.cat(seq, dim=2)[::self.factor], x_lens


class RNNT(nn.Module):

  def __init__(self, n_classes=1024, in_feats=240, enc_n_hid=1024,
               enc_pre_rnn_layers=2, enc_post_rnn_layers=3,
               enc_stack_time_factor=2, enc_dropout=0.1, pred_dropout=0.3,
               joint_dropout=0.3, pred_n_hid=512, pred_rnn_layers=2,
               joint_n_hid=512, forget_gate_bias=1.0,
               hidden_hidden_bias_scale=0.0, weights_init_scale=0.5):
    super().__init__()
    kw = dict(forget_gate_bias=forget_gate_bias,
              weights_init_scale=weights_init_scale,
              hidden_hidden_bias_scale=hidden_hidden_bias_scale)
    self.pred_n_hid = pred_n_hid
    self.encoder = nn.ModuleDict({
        'pre_rnn': LSTM(in_feats, enc_n_hid, enc_pre_rnn_layers, enc_dropout,
                        **kw),
        'stack_time': StackTime(enc_stack_time_factor),
        'post_rnn': LSTM(enc_stack_time_factor * enc_n_hid, enc_n_hid,
                         enc_post_rnn_layers, enc_dropout, **kw)})
    self.prediction = nn.ModuleDict({
        'embed': nn.Embedding(n_classes - 1, pred_n_hid),
        'dec_rnn': LSTM(pred_n_hid, pred_n_hid, pred_rnn_layers,
                        pred_dropout, **kw)})
    self.joint_pred = nn.Linear(pred_n_hid, joint_n_hid)
    self.joint_enc = nn.Linear(enc_n_hid, joint_n_hid)
    self.joint_net = nn.Sequential(nn.ReLU(inplace=True),
                                   nn.Dropout(p=joint_dropout),
                                   nn.Linear(joint_n_hid, n_classes))

  def encode(self, x, x_lens):                  # x: (T, B, F)
    x, _ = self.encoder['pre_rnn'](x, None)
    x, x_lens = self.encoder['stack_time'](x, x_lens)
    x, _ = self.encoder['post_rnn'](x, None)
    return x.transpose(0, 1), x_lens

  def predict(self, y, state=None):             # y: (B, U)
    y = self.prediction['embed'](y)
    b, _, h = y.shape
    y = torch.cat([torch.zeros((b, 1, h), dtype=y.dtype), y], dim=1)
    g, hid = self.prediction['dec_rnn'](y.transpose(0, 1), state)
    return g.transpose(0, 1), hid

  def joint(self, f, g):
    f = self.joint_enc(f).unsqueeze(2)
    g = self.joint_pred(g).unsqueeze(1)
    return self.joint_net(f + g)

  def forward(self, x, x_lens, y):
    f, x_lens = self.encode(x, x_lens)
    g, _ = self.predict(y)
    return self.joint(f, g), x_lens
