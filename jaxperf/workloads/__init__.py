"""The registry of workloads: CLI name -> workload class."""

from __future__ import annotations

import importlib

from jaxperf.errors import ConfigError

# CLI name -> "module:Class"; modules are imported only when used.
_REGISTRY = {
    'resnet50': 'jaxperf.workloads.resnet:ResNet50',
    'unet3d': 'jaxperf.workloads.unet3d:UNet3D',
    'bert': 'jaxperf.workloads.bert:Bert',
    'dlrm': 'jaxperf.workloads.dlrm:DLRM',
    'retinanet': 'jaxperf.workloads.retinanet:RetinaNet',
    'maskrcnn': 'jaxperf.workloads.maskrcnn:MaskRCNN',
    'rnnt': 'jaxperf.workloads.rnnt:RNNT',
    'minigo': 'jaxperf.workloads.minigo:MiniGo',
}
ALIASES = {'resnet': 'resnet50', 'ssd': 'retinanet'}


def names() -> list[str]:
  return list(_REGISTRY)


def get(name: str):
  """The workload class for a CLI name."""
  key = ALIASES.get(name, name)
  if key not in _REGISTRY:
    raise ConfigError(f'--model {name!r}: unknown workload; available: '
                      f'{", ".join(_REGISTRY)} (see --list)')
  module, cls = _REGISTRY[key].split(':')
  return getattr(importlib.import_module(module), cls)
