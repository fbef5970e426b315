"""The MLPerf 3D U-Net in PyTorch, with the reference's module and tensor names.

Follows mlcommons/training image_segmentation/pytorch/model/unet3d.py (class
Unet3D) and model/layers.py (conv_block_factory, InputBlock, DownsampleBlock,
UpsampleBlock, OutputLayer) with instance normalisation, the reference's
only normalisation in MLPerf runs: the same modules, registered in the same
order, with PyTorch's default initialisation, so its state_dict has the
reference's keys and shapes, and a given torch.manual_seed draws the same
weights. jaxperf.compare and the parity tests use it; jaxperf.interop maps its
state_dict to models/unet3d.py.

Every conv block is nn.Sequential(conv, norm or Identity, activation or
Identity), hence the tensor names:

    input_block.conv{1,2}.0.weight                  3x3x3 conv, no bias
    input_block.conv{1,2}.1.{weight,bias}           InstanceNorm3d (affine)
    downsample.{0..3}.conv{1,2}.*                   conv1 has stride 2
    bottleneck.conv{1,2}.*
    upsample.{0..4}.upsample_conv.0.{weight,bias}   ConvTranspose3d k2 s2,
                                                    weight (in, out, 2, 2, 2)
    upsample.{0..4}.conv{1,2}.*
    output.conv.0.{weight,bias}                     1x1x1 conv with bias

Input NCDHW [N, in_channels, D, H, W], logits NCDHW [N, n_class, D, H, W].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FILTERS = (32, 64, 128, 256, 320)
ACTIVATIONS = ('relu', 'leaky_relu')


def _activation(name: str | None) -> nn.Module:
  if name is None:
    return nn.Identity()
  if name == 'relu':
    return nn.ReLU()
  if name == 'leaky_relu':
    return nn.LeakyReLU(0.01)
  raise ValueError(f'activation must be one of {ACTIVATIONS}, got {name!r}')


def conv_block(in_channels: int, out_channels: int, *, kernel_size: int = 3,
               stride: int = 1, padding: int = 1, transpose: bool = False,
               norm: bool = True, activation: str | None = 'relu'
               ) -> nn.Sequential:
  """[conv, instance norm or Identity, activation or Identity].

  The conv has a bias only when no norm follows it.
  """
  conv_cls = nn.ConvTranspose3d if transpose else nn.Conv3d
  conv = conv_cls(in_channels, out_channels, kernel_size=kernel_size,
                  stride=stride, padding=padding, bias=not norm)
  normalization = (nn.InstanceNorm3d(out_channels, affine=True) if norm
                   else nn.Identity())
  return nn.Sequential(conv, normalization, _activation(activation))


class InputBlock(nn.Module):
  """Two stride-1 conv blocks."""

  def __init__(self, in_channels: int, out_channels: int, activation: str):
    super().__init__()
    self.conv1 = conv_block(in_channels, out_channels, activation=activation)
    self.conv2 = conv_block(out_channels, out_channels, activation=activation)

  def forward(self, x):
    return self.conv2(self.conv1(x))


class DownsampleBlock(nn.Module):
  """A stride-2 conv block, then a stride-1 one."""

  def __init__(self, in_channels: int, out_channels: int, activation: str):
    super().__init__()
    self.conv1 = conv_block(in_channels, out_channels, stride=2,
                            activation=activation)
    self.conv2 = conv_block(out_channels, out_channels, activation=activation)

  def forward(self, x):
    return self.conv2(self.conv1(x))


class UpsampleBlock(nn.Module):
  """Transposed conv (k2 s2, bias), concat with the skip, two conv blocks."""

  def __init__(self, in_channels: int, out_channels: int, activation: str):
    super().__init__()
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.upsample_conv = conv_block(in_channels, out_channels, kernel_size=2,
                                    stride=2, padding=0, transpose=True,
                                    norm=False, activation=None)
    self.conv1 = conv_block(2 * out_channels, out_channels,
                            activation=activation)
    self.conv2 = conv_block(out_channels, out_channels, activation=activation)

  def forward(self, x, skip):
    x = torch.cat((self.upsample_conv(x), skip), dim=1)
    return self.conv2(self.conv1(x))


class OutputLayer(nn.Module):
  """1x1x1 conv with bias to the class logits."""

  def __init__(self, in_channels: int, n_class: int):
    super().__init__()
    self.conv = conv_block(in_channels, n_class, kernel_size=1, padding=0,
                           norm=False, activation=None)

  def forward(self, x):
    return self.conv(x)


class Unet3D(nn.Module):
  """The reference Unet3D (normalization='instancenorm').

  Args:
    in_channels: input channels (1 for KiTS19).
    n_class: output classes (3: background, kidney, tumor).
    activation: 'relu' (the reference's default) or 'leaky_relu' (0.01).
    filters: the five widths; the reference's are fixed at FILTERS, others
      give the same structure, narrower.
    weights_init_scale: multiplies every initial weight and bias, as the
      reference's argument of that name (default 1).
  """

  def __init__(self, in_channels: int = 1, n_class: int = 3,
               activation: str = 'relu',
               filters: Sequence[int] = FILTERS,
               weights_init_scale: float = 1.0):
    super().__init__()
    filters = [int(f) for f in filters]
    if len(filters) != 5:
      raise ValueError(f'filters must have 5 widths, got {filters}')
    _activation(activation)   # rejects unknown names before building
    self.filters = filters
    self.inp = filters[:-1]
    self.out = filters[1:]
    self.input_block = InputBlock(in_channels, filters[0], activation)
    self.downsample = nn.ModuleList(
        [DownsampleBlock(i, o, activation) for i, o in zip(self.inp, self.out)])
    self.bottleneck = DownsampleBlock(filters[-1], filters[-1], activation)
    ups = [UpsampleBlock(filters[-1], filters[-1], activation)]
    ups += [UpsampleBlock(i, o, activation)
            for i, o in zip(reversed(self.out), reversed(self.inp))]
    self.upsample = nn.ModuleList(ups)
    self.output = OutputLayer(filters[0], n_class)
    if weights_init_scale != 1.0:
      with torch.no_grad():
        for name, p in self.named_parameters():
          if 'weight' in name or 'bias' in name:
            p.mul_(float(weights_init_scale))

  def forward(self, x):
    x = self.input_block(x)
    skips = [x]
    for block in self.downsample:
      x = block(x)
      skips.append(x)
    x = self.bottleneck(x)
    for block, skip in zip(self.upsample, reversed(skips)):
      x = block(x, skip)
    return self.output(x)
