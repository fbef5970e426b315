"""Small pieces of the trainer: MFU bookkeeping and the epoch schedule."""

import types

from jaxperf.trainer import _peak_flops
from jaxperf.workloads.base import Schedule


def test_peak_flops_by_device_kind():
  dev = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert _peak_flops(dev('NVIDIA H100 80GB HBM3')) == 989.4e12
  assert _peak_flops(dev('NVIDIA H200')) == 989.4e12
  assert _peak_flops(dev('NVIDIA H20')) == 148e12
  assert _peak_flops(dev('NVIDIA A100-SXM4-80GB')) == 312e12
  assert _peak_flops(dev('TPU v5 lite')) == 197e12
  assert _peak_flops(dev('cpu')) is None


def test_schedule_rounds_epoch_boundaries_up():
  s = Schedule(train_examples=1281167, global_batch=3264)
  assert s.steps_for(1) == 393            # the batch crossing the boundary
  assert s.steps_for(4) == 1571           # ceil(4 * 1281167 / 3264)
  assert abs(s.epoch_of(393) - 393 * 3264 / 1281167) < 1e-12
  assert Schedule(2048, 64).steps_for(3) == 96
