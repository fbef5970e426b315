"""The scripts in tests/data that wrote the committed fixtures, as modules
(their sizes and constants; they import nothing from jaxperf)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

DATA = pathlib.Path(__file__).parent / 'data'


def load(name: str) -> ModuleType:
  """tests/data/<name>.py, imported by path."""
  spec = importlib.util.spec_from_file_location(name, DATA / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
