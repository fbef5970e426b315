"""TFRecord files and tf.train.Example records, read and written without TensorFlow.

A TFRecord file is a sequence of records, each
    uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)
(little endian), where masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2^32.
An Example is the protobuf
    Example { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      (entries: key = 1, value = 2)
    Feature { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                      Int64List int64_list = 3; } }      (each: repeated value = 1)
Both are small, stable wire formats, so we parse them directly.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import google_crc32c
import numpy as np

from jaxperf.errors import DataError

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------- container


def index_records(path: str) -> np.ndarray:
  """Offsets and lengths (N, 2) of the records of a file, reading headers only."""
  out = []
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    offset = 0
    while offset < size:
      header = f.read(12)
      if len(header) < 12:
        raise DataError(f'{path}: truncated TFRecord header at byte {offset}')
      length, crc = struct.unpack('<QI', header)
      if masked_crc(header[:8]) != crc:
        raise DataError(f'{path}: corrupt TFRecord (bad length checksum) at '
                        f'byte {offset}')
      end = offset + 12 + length + 4
      if end > size:
        raise DataError(f'{path}: truncated TFRecord at byte {offset} (record '
                        f'of {length} bytes runs past the end of the file)')
      out.append((offset, length))
      offset = end
      f.seek(offset)
  return np.asarray(out, np.int64).reshape(-1, 2)


def read_record(f: BinaryIO, path: str, offset: int, length: int) -> bytes:
  """The data of the record at `offset`, with its checksum verified."""
  f.seek(offset + 12)
  blob = f.read(length + 4)
  if len(blob) < length + 4:
    raise DataError(f'{path}: truncated TFRecord at byte {offset}')
  data, (crc,) = blob[:length], struct.unpack('<I', blob[length:])
  if masked_crc(data) != crc:
    raise DataError(f'{path}: corrupt TFRecord (bad data checksum) in the '
                    f'record at byte {offset}')
  return data


def iter_records(path: str) -> Iterator[bytes]:
  with open(path, 'rb') as f:
    for offset, length in index_records(path):
      yield read_record(f, path, int(offset), int(length))


def write_records(path: str, records: Iterable[bytes]) -> None:
  with open(path, 'wb') as f:
    for data in records:
      header = struct.pack('<Q', len(data))
      f.write(header + struct.pack('<I', masked_crc(header)))
      f.write(data + struct.pack('<I', masked_crc(data)))


# ---------------------------------------------------------------- protobuf


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('truncated varint')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError('varint too long')


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of a serialized message."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
      if pos > len(buf):
        raise ValueError('truncated length-delimited field')
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f'unsupported wire type {wire}')
    yield field, wire, value


def _signed64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes) -> list:
  for kind, _, inner in _fields(buf):
    values: list = []
    for _, wire, v in _fields(inner):
      if kind == 1:                                   # bytes_list
        values.append(bytes(v))
      elif kind == 2:                                 # float_list
        if wire == 2:
          values.extend(np.frombuffer(v, '<f4').tolist())
        else:
          values.append(struct.unpack('<f', v)[0])
      elif kind == 3:                                 # int64_list
        if wire == 2:
          pos = 0
          while pos < len(v):
            x, pos = _varint(v, pos)
            values.append(_signed64(x))
        else:
          values.append(_signed64(v))
    return values
  return []


def parse_example(data: bytes) -> dict[str, list]:
  """A serialized tf.train.Example as {feature name: list of values}."""
  out: dict[str, list] = {}
  for field, _, features in _fields(data):
    if field != 1:
      continue
    for entry_field, _, entry in _fields(features):
      if entry_field != 1:
        continue
      key, value = None, b''
      for f, _, v in _fields(entry):
        if f == 1:
          key = bytes(v).decode('utf-8')
        elif f == 2:
          value = v
      if key is not None:
        out[key] = _feature(value)
  return out


def _put_varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
  return _put_varint(field << 3 | 2) + _put_varint(len(payload)) + payload


def serialize_example(features: Mapping[str, Any]) -> bytes:
  """A tf.train.Example from {name: bytes | str | list of bytes/int/float}."""
  entries = b''
  for name, value in features.items():
    if isinstance(value, (bytes, str, int, float)):
      value = [value]
    value = [v.encode() if isinstance(v, str) else v for v in value]
    if all(isinstance(v, bytes) for v in value):
      inner = b''.join(_len_field(1, v) for v in value)
      feature = _len_field(1, inner)
    elif all(isinstance(v, (int, np.integer)) for v in value):
      packed = b''.join(_put_varint(int(v)) for v in value)
      feature = _len_field(3, _len_field(1, packed))
    else:
      packed = np.asarray(value, '<f4').tobytes()
      feature = _len_field(2, _len_field(1, packed))
    entry = _len_field(1, name.encode()) + _len_field(2, feature)
    entries += _len_field(1, entry)
  return _len_field(1, entries)


def write_examples(path: str, examples: Iterable[Mapping[str, Any]]) -> None:
  write_records(path, (serialize_example(e) for e in examples))
