"""Workload configs: one YAML file per workload, a base plus named scales.

A config file in configs/ looks like

    workload: resnet50
    base:            # the MLPerf reference hyperparameters, every key there is
      key: value     # a valid key; nothing else is
    scales:
      smoke: {key: value, ...}   # overrides of base keys
      1gpu: {...}

`load_config` resolves base <- scale <- (a user YAML file of overrides) <-
`--set key=value` overrides into one immutable `Config`. An unknown key, in a
scale, a file or a --set, is an error that names it and suggests close matches.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from jaxperf.errors import ConfigError


class Config(Mapping):
  """An immutable flat mapping of config keys, readable as attributes."""

  def __init__(self, values: Mapping[str, Any], *, workload: str, scale: str):
    object.__setattr__(self, '_values', dict(values))
    object.__setattr__(self, 'workload', workload)
    object.__setattr__(self, 'scale', scale)

  def __getattr__(self, name):
    if name.startswith('_'):  # copy/pickle probe dunders before __init__ ran
      raise AttributeError(name)
    try:
      return self._values[name]
    except KeyError:
      raise AttributeError(
          f'config of {self.workload} has no key {name!r}') from None

  def __setattr__(self, name, value):
    raise AttributeError('Config is immutable; use .replace(...)')

  def __getitem__(self, key):
    return self._values[key]

  def __iter__(self):
    return iter(self._values)

  def __len__(self):
    return len(self._values)

  def replace(self, **updates) -> Config:
    _check_known(updates, self._values, 'replace()')
    return Config({**self._values, **updates}, workload=self.workload,
                  scale=self.scale)

  def to_dict(self) -> dict[str, Any]:
    return dict(self._values)

  def __repr__(self):
    return f'Config({self.workload}:{self.scale}, {self._values})'


def _config_text(workload: str) -> tuple[str, str]:
  name = f'{workload}.yaml'
  res = importlib.resources.files('jaxperf.configs').joinpath(name)
  if not res.is_file():
    raise ConfigError(f'no config file {name} in jaxperf.configs')
  return res.read_text(), str(res)


def _load_yaml(text: str, where: str) -> Any:
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ConfigError(f'{where}: not valid YAML: {e}') from None


def workload_file(workload: str) -> dict[str, Any]:
  text, where = _config_text(workload)
  data = _load_yaml(text, where)
  if not isinstance(data, dict) or 'base' not in data:
    raise ConfigError(f'{where}: expected a mapping with a `base:` section')
  data.setdefault('scales', {})
  return data


def scale_names(workload: str) -> list[str]:
  return list(workload_file(workload)['scales'])


def _check_known(updates: Mapping[str, Any], base: Mapping[str, Any],
                 where: str) -> None:
  for key in updates:
    if key not in base:
      close = difflib.get_close_matches(key, list(base), n=3)
      hint = f' (did you mean {", ".join(close)}?)' if close else ''
      raise ConfigError(f'{where}: unknown config key {key!r}{hint}. '
                        f'Valid keys: {", ".join(sorted(base))}')


def _coerce(key: str, value: Any, reference: Any, where: str) -> Any:
  """Checks `value` against the type of the base value it overrides."""
  if reference is None or value is None:
    return value
  if (isinstance(reference, (int, float)) and not isinstance(reference, bool)
      and isinstance(value, str)):
    try:  # YAML reads 1e9 (no dot) as a string
      value = float(value)
    except ValueError:
      pass
  if isinstance(reference, bool):
    if isinstance(value, bool):
      return value
  elif isinstance(reference, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif isinstance(reference, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif isinstance(reference, str):
    if isinstance(value, str):
      return value
  elif isinstance(reference, (list, tuple)):
    if isinstance(value, (list, tuple)):
      return list(value)
  elif isinstance(reference, dict):
    if isinstance(value, dict):
      return value
  else:
    return value
  raise ConfigError(f'{where}: {key}={value!r} has the wrong type: expected '
                    f'{type(reference).__name__} like the default {reference!r}')


def parse_set(items: Iterable[str]) -> dict[str, Any]:
  """Parses repeated `--set key=value`; values are YAML scalars/lists."""
  out = {}
  for item in items:
    if '=' not in item:
      raise ConfigError(f'--set {item!r}: expected key=value')
    key, raw = item.split('=', 1)
    key = key.strip()
    if not key:
      raise ConfigError(f'--set {item!r}: empty key')
    out[key] = _load_yaml(raw, f'--set {item!r}') if raw.strip() else ''
  return out


def load_config(workload: str, config: str | None = None,
                overrides: Mapping[str, Any] | None = None,
                default_scale: str | None = None) -> Config:
  """Resolves a workload's config.

  Args:
    workload: the workload name (the configs/<workload>.yaml file).
    config: a scale name from that file, or a path to a YAML file of
      overrides (which may name its scale with a `scale:` key).
    overrides: parsed --set overrides, applied last.
    default_scale: the scale used when `config` does not name one.
  """
  data = workload_file(workload)
  base = dict(data['base'])
  scales = data['scales']
  file_overrides: dict[str, Any] = {}
  scale = default_scale
  if config:
    if config in scales:
      scale = config
    elif os.path.exists(config) or config.endswith(('.yaml', '.yml')):
      if not os.path.isfile(config):
        raise ConfigError(f'--config {config}: no such file')
      with open(config) as f:
        user = _load_yaml(f.read(), f'--config {config}') or {}
      if not isinstance(user, dict):
        raise ConfigError(f'--config {config}: expected a mapping of '
                          f'config keys to values')
      scale = user.pop('scale', scale)
      file_overrides = user
    else:
      raise ConfigError(
          f'--config {config!r}: not a scale of {workload} '
          f'({", ".join(scales)}) and not a YAML file')
  values = dict(base)
  layers = []
  if scale is not None:
    if scale not in scales:
      raise ConfigError(f'unknown scale {scale!r} for {workload}; '
                        f'choose one of: {", ".join(scales)}')
    layers.append((scales[scale] or {}, f'scale {scale!r} of {workload}'))
  layers.append((file_overrides, f'--config {config}'))
  layers.append((dict(overrides or {}), '--set'))
  for layer, where in layers:
    _check_known(layer, base, where)
    for key, value in layer.items():
      values[key] = _coerce(key, value, base[key], f'{where}')
  return Config(values, workload=workload, scale=scale or 'base')


def dump(config: Config) -> str:
  return yaml.safe_dump({'workload': config.workload, 'scale': config.scale,
                         **config.to_dict()}, sort_keys=False)


__all__ = ['Config', 'load_config', 'parse_set', 'scale_names', 'dump',
           'workload_file']
