"""TFRecord files of tf.train.Example records, without TensorFlow.

Container: each record is
    uint64 length | uint32 masked crc(length) | data | uint32 masked crc(data)
(little endian), with crc32c masked as
    masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8  (mod 2^32).

Payload: the protobuf messages
    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }  // entry: key 1, value 2
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }
parsed here with a small wire-format reader (packed and unpacked repeated
numbers both accepted, unknown fields skipped).

`TFRecordImageNet` reads ImageNet in the MLPerf reference's shards
(train-00000-of-01024, ...: 'image/encoded', 'image/class/label' stored 1..1000)
or in TFDS imagenet2012 shards (imagenet2012-train.tfrecord-00000-of-01024,
...: 'image', 'label' stored 0..999). Opening scans the record headers once to
index every record; records are read, checked and decoded on demand.
"""

from __future__ import annotations

import concurrent.futures
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import google_crc32c
import numpy as np

from jaxperf.data.augment import ImageDataset
from jaxperf.errors import DataError

_MASK_DELTA = 0xA282EAD8
_HEADER = 12   # length (8) + its crc (4)
_FOOTER = 4    # data crc

# Feature keys and label offsets of the two known ImageNet layouts.
MLPERF_LAYOUT = {'image_key': 'image/encoded', 'label_key': 'image/class/label',
                 'label_offset': -1}
TFDS_LAYOUT = {'image_key': 'image', 'label_key': 'label', 'label_offset': 0}


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: crc32c, rotated right by 15 and offset."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _where(path: str, ordinal: int, offset: int) -> str:
  return f'{path} record {ordinal} (byte offset {offset})'


# ---------------------------------------------------------------- container


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> None:
  """Writes `records` as a TFRecord file."""
  with open(path, 'wb') as f:
    for data in records:
      length = struct.pack('<Q', len(data))
      f.write(length)
      f.write(struct.pack('<I', masked_crc32c(length)))
      f.write(data)
      f.write(struct.pack('<I', masked_crc32c(data)))


def index_records(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, lengths) of every record in a file, reading headers only.

  Checks each length's checksum and that every record fits in the file.
  """
  path = os.fspath(path)
  offsets, lengths = [], []
  try:
    size = os.path.getsize(path)
    with open(path, 'rb', buffering=0) as f:
      offset = 0
      while offset < size:
        header = os.pread(f.fileno(), _HEADER, offset)
        where = _where(path, len(offsets), offset)
        if len(header) < _HEADER:
          raise DataError(f'truncated TFRecord {where}: {len(header)} bytes '
                          f'left, expected a {_HEADER}-byte record header')
        length, crc = struct.unpack('<QI', header)
        if masked_crc32c(header[:8]) != crc:
          raise DataError(f'corrupt TFRecord {where}: the length field fails '
                          f'its crc32c (not a TFRecord file, or damaged)')
        end = offset + _HEADER + length + _FOOTER
        if end > size:
          raise DataError(f'truncated TFRecord {where}: a {length}-byte '
                          f'record needs {end - offset} bytes, the file has '
                          f'{size - offset} left')
        offsets.append(offset)
        lengths.append(length)
        offset = end
  except OSError as e:
    raise DataError(f'{path}: cannot be read ({e})') from None
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def read_record(path: str, offset: int, length: int, ordinal: int = 0
                ) -> bytes:
  """The data of the record at byte `offset`, its checksum verified."""
  where = _where(path, ordinal, offset)
  try:
    fd = os.open(path, os.O_RDONLY)
    try:
      blob = os.pread(fd, length + _FOOTER, offset + _HEADER)
    finally:
      os.close(fd)
  except OSError as e:
    raise DataError(f'{where}: cannot be read ({e})') from None
  if len(blob) < length + _FOOTER:
    raise DataError(f'truncated TFRecord {where}: expected {length} bytes of '
                    f'data and a checksum, found {len(blob)} bytes')
  data = blob[:length]
  (crc,) = struct.unpack('<I', blob[length:])
  if masked_crc32c(data) != crc:
    raise DataError(f'corrupt TFRecord {where}: the data fails its crc32c')
  return data


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
  """Every record of a file, in order, each checked."""
  path = os.fspath(path)
  offsets, lengths = index_records(path)
  for i, (offset, length) in enumerate(zip(offsets.tolist(),
                                           lengths.tolist())):
    yield read_record(path, offset, length, i)


# ---------------------------------------------------------------- protobuf


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('truncated varint')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise ValueError('varint longer than 10 bytes')


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) for each field of a message.

  Values: int for varints, memoryview for length-delimited, fixed32 and
  fixed64 fields.
  """
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire in (1, 5):
      n = 8 if wire == 1 else 4
      value, pos = buf[pos:pos + n], pos + n
    else:
      raise ValueError(f'unsupported wire type {wire} (field {number})')
    if pos > end:
      raise ValueError(f'field {number} runs past the end of its message')
    yield number, wire, value


def _int64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _feature_values(buf: memoryview) -> list:
  """The values of a serialized Feature (the last kind set wins)."""
  kind, values = 0, []
  for number, wire, list_msg in _fields(buf):
    if number not in (1, 2, 3) or wire != 2:
      continue
    if number != kind:
      kind, values = number, []
    for field, vwire, v in _fields(list_msg):
      if field != 1:
        continue
      if kind == 1 and vwire == 2:
        values.append(bytes(v))
      elif kind == 2 and vwire == 2:
        if len(v) % 4:
          raise ValueError('packed floats not a multiple of 4 bytes')
        values.extend(np.frombuffer(v, '<f4').tolist())
      elif kind == 2 and vwire == 5:
        values.append(struct.unpack('<f', v)[0])
      elif kind == 3 and vwire == 2:
        pos = 0
        while pos < len(v):
          x, pos = _read_varint(v, pos)
          values.append(_int64(x))
      elif kind == 3 and vwire == 0:
        values.append(_int64(v))
      else:
        raise ValueError(f'wire type {vwire} in a '
                         f'{("", "bytes", "float", "int64")[kind]} list')
  return values


def parse_example(data: bytes, keys: Iterable[str] | None = None
                  ) -> dict[str, list]:
  """A serialized tf.train.Example as {feature name: list of values}.

  Values are bytes, float or int by the feature's kind. With `keys`, only those
  features are decoded. Raises ValueError if `data` is not a valid Example.
  """
  wanted = None if keys is None else set(keys)
  out: dict[str, list] = {}
  for number, wire, features in _fields(memoryview(data)):
    if number != 1 or wire != 2:
      continue
    for entry_number, entry_wire, entry in _fields(features):
      if entry_number != 1 or entry_wire != 2:
        continue
      key, value = '', None
      for f, w, v in _fields(entry):
        if f == 1 and w == 2:
          key = bytes(v).decode('utf-8')
        elif f == 2 and w == 2:
          value = v
      if wanted is None or key in wanted:
        out[key] = [] if value is None else _feature_values(value)
  return out


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(name: str, value: Any) -> bytes:
  """A serialized Feature from bytes/str/int/float or a sequence of one kind."""
  if isinstance(value, (bytes, bytearray, str, int, float, np.generic)):
    value = [value]
  value = list(value)
  if not value:
    raise ValueError(f'feature {name!r}: an empty list has no type; '
                     f'leave the feature out instead')
  if all(isinstance(v, (bytes, bytearray, str)) for v in value):
    items = b''.join(_delimited(1, v.encode() if isinstance(v, str)
                                else bytes(v)) for v in value)
    return _delimited(1, items)
  if all(isinstance(v, (int, np.integer)) for v in value):
    packed = b''.join(_varint(int(v)) for v in value)
    return _delimited(3, _delimited(1, packed))
  if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
    packed = np.asarray(value, '<f4').tobytes()
    return _delimited(2, _delimited(1, packed))
  kinds = sorted({type(v).__name__ for v in value})
  raise ValueError(f'feature {name!r}: values must all be bytes/str, all '
                   f'int or all numbers, got {kinds}')


def serialize_example(features: Mapping[str, Any]) -> bytes:
  """A serialized tf.train.Example from {name: value or list of values}."""
  entries = b''.join(
      _delimited(1, _delimited(1, name.encode()) +
                 _delimited(2, _feature(name, value)))
      for name, value in features.items())
  return _delimited(1, entries)


def write_tfrecord(path: str | os.PathLike,
                   examples: Iterable[Mapping[str, Any]]) -> None:
  """Writes tf.train.Examples, e.g. {'image': jpeg, 'label': [3]}, to `path`.

  Values: bytes/str (a BytesList), ints (an Int64List) or floats (a
  FloatList), alone or in a list.
  """
  write_records(path, (serialize_example(e) for e in examples))


# ---------------------------------------------------------------- dataset


class TFRecordImageNet(ImageDataset):
  """ImageNet from TFRecord shards, ordered by file name, then position.

  Labels are `label_key`'s value plus `label_offset` (-1 for the reference's
  1-based labels) and must land in [0, num_classes).
  """

  def __init__(self, files: Sequence[str | os.PathLike], *, image_size: int,
               seed: int = 0, num_workers: int = 8, prefetch: int = 2,
               image_key: str = MLPERF_LAYOUT['image_key'],
               label_key: str = MLPERF_LAYOUT['label_key'],
               label_offset: int = MLPERF_LAYOUT['label_offset'],
               num_classes: int = 1000):
    files = sorted(os.fspath(f) for f in files)
    if not files:
      raise DataError('no TFRecord files given (expected shards such as '
                      'train-00000-of-01024)')
    self.files = files
    self.image_key = image_key
    self.label_key = label_key
    self.label_offset = int(label_offset)
    # One pass over the headers, the files in parallel.
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      indexes = list(pool.map(index_records, files))
    counts = [len(offsets) for offsets, _ in indexes]
    total = sum(counts)
    if not total:
      raise DataError(f'{os.path.dirname(files[0]) or "."}: the {len(files)} '
                      f'TFRecord files ({os.path.basename(files[0])}, ...) '
                      f'hold no records')
    self._file = np.repeat(np.arange(len(files), dtype=np.int32), counts)
    self._offset = np.concatenate([o for o, _ in indexes])
    self._length = np.concatenate([n for _, n in indexes])
    self._first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    super().__init__(total, num_classes, image_size=image_size, seed=seed,
                     num_workers=num_workers, prefetch=prefetch)

  def where(self, index: int) -> str:
    """The file, record number and byte offset of example `index`."""
    f = int(self._file[index])
    return _where(self.files[f], index - int(self._first[f]),
                  int(self._offset[index]))

  def example(self, index: int) -> dict[str, list]:
    """The checked, parsed features of example `index`."""
    f = int(self._file[index])
    data = read_record(self.files[f], int(self._offset[index]),
                       int(self._length[index]),
                       index - int(self._first[f]))
    try:
      return parse_example(data, (self.image_key, self.label_key))
    except (ValueError, UnicodeDecodeError) as e:
      raise DataError(f'{self.where(index)}: not a valid tf.train.Example '
                      f'({e})') from None

  def read(self, index: int) -> tuple[bytes, int, str]:
    ex = self.example(index)
    image = ex.get(self.image_key, [])
    label = ex.get(self.label_key, [])
    if (len(image) != 1 or not isinstance(image[0], bytes) or len(label) != 1
        or not isinstance(label[0], int)):
      raise DataError(
          f'{self.where(index)}: expected one encoded image in '
          f'{self.image_key!r} and one int64 label in {self.label_key!r}, '
          f'found {self.image_key!r}: {_describe(image)}, {self.label_key!r}: '
          f'{_describe(label)}')
    cls = label[0] + self.label_offset
    if not 0 <= cls < self.num_classes:
      raise DataError(
          f'{self.where(index)}: label {label[0]} in {self.label_key!r} gives '
          f'class {cls} (offset {self.label_offset:+d}), outside '
          f'[0, {self.num_classes})')
    return image[0], cls, self.where(index)


def _describe(values: list) -> str:
  if not values:
    return 'missing or empty'
  kinds = sorted({type(v).__name__ for v in values})
  return f'{len(values)} value(s) of type {"/".join(kinds)}'
