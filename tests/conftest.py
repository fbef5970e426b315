"""Test setup: 8 simulated CPU devices, set before jax is imported."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The slowest files first: with `-n 2 --dist loadfile` they then start on
# different workers at once instead of one of them finishing the run alone.
_SLOW_FIRST = ('test_multihost.py', 'test_train_unet3d.py',
               'test_unet3d_spatial.py', 'test_train_cli.py',
               'test_train_bert.py', 'test_train_retinanet.py',
               'test_train_dlrm.py')


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)),
                                       len(rank)))
