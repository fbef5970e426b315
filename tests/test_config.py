"""Config resolution: base <- scale <- --config file <- --set."""

from __future__ import annotations

import copy
import pickle

import pytest
import yaml

from jaxperf.config import (Config, dump, load_config, parse_set, scale_names,
                            workload_file)
from jaxperf.errors import ConfigError


def test_base_config():
  cfg = load_config('resnet50')
  assert isinstance(cfg, Config)
  assert (cfg.workload, cfg.scale) == ('resnet50', 'base')
  assert cfg.global_batch_size == 3264
  assert cfg.base_learning_rate == 10.5
  assert cfg.optimizer == 'lars' and cfg.dtype == 'bfloat16'
  assert cfg.stage_sizes == [3, 4, 6, 3] and cfg.num_classes == 1000
  assert cfg.seed is None
  assert cfg['width'] == cfg.width == 64
  assert set(cfg) == set(workload_file('resnet50')['base'])


def test_scales():
  data = workload_file('resnet50')
  names = scale_names('resnet50')
  assert {'smoke', '1gpu', '8gpu'} <= set(names)
  for name in names:
    cfg = load_config('resnet50', name)
    assert cfg.scale == name
    assert cfg.to_dict() == {**data['base'], **data['scales'][name]}, name
  smoke = load_config('resnet50', 'smoke')
  assert (smoke.num_classes, smoke.image_size, smoke.width) == (10, 32, 16)
  assert smoke.dtype == 'float32' and smoke.division == 'open'
  # default_scale applies when --config names none.
  assert load_config('resnet50', default_scale='smoke').scale == 'smoke'


def test_unknown_scale():
  with pytest.raises(ConfigError, match="unknown scale 'nope'"):
    load_config('resnet50', default_scale='nope')


def test_unknown_set_key_names_it_and_suggests():
  with pytest.raises(ConfigError, match="'widht'") as e:
    load_config('resnet50', 'smoke', parse_set(['widht=8']))
  assert 'did you mean width' in str(e.value)
  with pytest.raises(ConfigError, match="'no_such_key'"):
    load_config('resnet50', None, {'no_such_key': 1})


def test_wrong_type():
  with pytest.raises(ConfigError, match='global_batch_size'):
    load_config('resnet50', None, parse_set(['global_batch_size=abc']))
  with pytest.raises(ConfigError, match='global_batch_size'):
    load_config('resnet50', None, {'global_batch_size': 2.5})
  with pytest.raises(ConfigError, match='zero_init_last_bn'):
    load_config('resnet50', None, {'zero_init_last_bn': 1})
  with pytest.raises(ConfigError, match='stage_sizes'):
    load_config('resnet50', None, {'stage_sizes': 3})
  with pytest.raises(ConfigError, match='optimizer'):
    load_config('resnet50', None, {'optimizer': 3})


def test_numeric_coercion():
  cfg = load_config('resnet50', None, parse_set([
      'base_learning_rate=3', 'weight_decay=1e-4', 'global_batch_size=256.0',
      'stage_sizes=[1, 1, 1, 1]', 'seed=7']))
  assert cfg.base_learning_rate == 3.0
  assert isinstance(cfg.base_learning_rate, float)
  assert cfg.weight_decay == 1e-4 and isinstance(cfg.weight_decay, float)
  assert cfg.global_batch_size == 256
  assert isinstance(cfg.global_batch_size, int)
  assert cfg.stage_sizes == [1, 1, 1, 1]
  assert cfg.seed == 7  # a null default takes any value


def test_config_file(tmp_path):
  path = tmp_path / 'mine.yaml'
  path.write_text('scale: smoke\nwidth: 8\nbase_learning_rate: 1\n')
  cfg = load_config('resnet50', str(path), {'global_batch_size': 32})
  assert cfg.scale == 'smoke'
  assert cfg.num_classes == 10  # from the smoke scale
  assert cfg.width == 8
  assert cfg.base_learning_rate == 1.0
  assert cfg.global_batch_size == 32
  # --set overrides the file.
  assert load_config('resnet50', str(path), {'width': 4}).width == 4
  # Without `scale:` the file applies to base.
  plain = tmp_path / 'plain.yaml'
  plain.write_text('width: 8\n')
  cfg = load_config('resnet50', str(plain))
  assert (cfg.scale, cfg.width, cfg.num_classes) == ('base', 8, 1000)


def test_config_file_errors(tmp_path):
  bad = tmp_path / 'bad.yaml'
  bad.write_text('scale: smoke\nwidht: 8\n')
  with pytest.raises(ConfigError, match="'widht'"):
    load_config('resnet50', str(bad))
  bad.write_text('- a list\n')
  with pytest.raises(ConfigError, match='mapping'):
    load_config('resnet50', str(bad))
  bad.write_text('width: [unclosed\n')
  with pytest.raises(ConfigError, match='YAML'):
    load_config('resnet50', str(bad))
  with pytest.raises(ConfigError, match='no such file'):
    load_config('resnet50', str(tmp_path / 'missing.yaml'))


def test_config_neither_scale_nor_file():
  with pytest.raises(ConfigError, match="'bogus'") as e:
    load_config('resnet50', 'bogus')
  assert 'smoke' in str(e.value)


def test_unknown_workload():
  with pytest.raises(ConfigError, match='no_such_workload'):
    load_config('no_such_workload')


def test_config_is_immutable():
  cfg = load_config('resnet50', 'smoke')
  with pytest.raises(AttributeError, match='immutable'):
    cfg.width = 3
  with pytest.raises(TypeError):
    cfg['width'] = 3
  with pytest.raises(AttributeError, match='no_such_key'):
    _ = cfg.no_such_key
  new = cfg.replace(width=4)
  assert new.width == 4 and cfg.width == 16 and new.scale == 'smoke'
  with pytest.raises(ConfigError, match="'widht'"):
    cfg.replace(widht=4)
  d = cfg.to_dict()
  d['width'] = 99
  assert cfg.width == 16


def test_config_equality():
  a = load_config('resnet50', 'smoke')
  assert a == load_config('resnet50', 'smoke')
  assert a != a.replace(width=8)


def test_config_copies_and_pickles():
  cfg = load_config('resnet50', 'smoke')
  for clone in (copy.copy(cfg), pickle.loads(pickle.dumps(cfg))):
    assert clone == cfg and clone.scale == 'smoke'


def test_parse_set():
  assert parse_set(['width=8', 'dtype=float32', 'stage_sizes=[1,2]',
                    'seed=null', 'submission_org=', 'x = a=b']) == {
                        'width': 8, 'dtype': 'float32', 'stage_sizes': [1, 2],
                        'seed': None, 'submission_org': '', 'x': 'a=b'}
  with pytest.raises(ConfigError, match='key=value'):
    parse_set(['width'])
  with pytest.raises(ConfigError, match='empty key'):
    parse_set(['=8'])
  with pytest.raises(ConfigError, match='YAML'):
    parse_set(['stage_sizes=[1,'])


def test_dump_round_trips():
  cfg = load_config('resnet50', 'smoke')
  data = yaml.safe_load(dump(cfg))
  assert data.pop('workload') == 'resnet50' and data.pop('scale') == 'smoke'
  assert data == cfg.to_dict()
