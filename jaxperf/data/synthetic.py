"""A synthetic, learnable image-classification source with ImageNet's interface.

Each class has a fixed smooth colour pattern (its prototype: a 4x4 grid of
colours, interpolated to the image size); an example is its
class's prototype plus noise drawn from a bank of noise images, so the label is
a function of the image that a convnet can learn, and the task gets harder as
`noise` grows. Batches are deterministic in (seed, step) and the stream can
start at any step, exactly like the real readers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_BANK = 257  # noise images per split (prime, so strides cycle through all)


def _interpolation(size: int, cells: int) -> np.ndarray:
  """(size, cells) weights that linearly interpolate `cells` values to `size`."""
  pos = (np.arange(size) + 0.5) * cells / size - 0.5
  lo = np.clip(np.floor(pos).astype(int), 0, cells - 1)
  hi = np.clip(lo + 1, 0, cells - 1)
  frac = np.clip(pos - lo, 0.0, 1.0)
  w = np.zeros((size, cells), np.float32)
  w[np.arange(size), lo] += 1 - frac
  w[np.arange(size), hi] += frac
  return w


class SyntheticImages:
  """`num_examples` images of `image_size`^2 x 3 uint8 in `num_classes` classes."""

  def __init__(self, num_examples: int, num_classes: int, image_size: int, *,
               seed: int = 0, shuffle_seed: int | None = None,
               noise: float = 40.0, label_noise: float = 0.0,
               split: str = 'train'):
    if num_examples < 1 or num_classes < 1 or image_size < 1:
      raise ValueError('synthetic data needs positive sizes')
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.shuffle_seed = self.seed if shuffle_seed is None else int(shuffle_seed)
    self.split = split
    # Prototypes and labels depend on the data seed only, so train and eval
    # share classes; the noise bank differs between splits.
    proto_rng = np.random.default_rng([self.seed, 0xC1A55])
    self._grid = proto_rng.uniform(40, 215, (num_classes, 4, 4, 3)).astype(
        np.float32)
    self._interp = _interpolation(self.image_size, 4)
    split_id = 1 if split == 'train' else 2
    bank_rng = np.random.default_rng([self.seed, split_id])
    # int8 keeps the bank small at 224x224 (noise beyond +-127 is clipped).
    self._bank = np.clip(np.rint(bank_rng.standard_normal(
        (_BANK, self.image_size, self.image_size, 3), np.float32) * noise),
                         -127, 127).astype(np.int8)
    label_rng = np.random.default_rng([self.seed, split_id, 7])
    self._classes = label_rng.integers(0, num_classes, self.num_examples
                                       ).astype(np.int32)
    # A fraction of examples carry a random label, so no model is perfect
    # (as on real data): accuracy tops out near 1 - label_noise * (1 - 1/C).
    flip = label_rng.random(self.num_examples) < label_noise
    self._labels = np.where(
        flip, label_rng.integers(0, num_classes, self.num_examples),
        self._classes).astype(np.int32)

  def _images(self, index: np.ndarray, epoch: np.ndarray) -> dict[str, np.ndarray]:
    labels = self._labels[index]
    classes = self._classes[index]
    noise = self._bank[(index * 31 + epoch * 17) % _BANK]
    # Smooth class prototype: the 4x4 colour grid of the label, interpolated.
    proto = np.einsum('ih,bhwc,jw->bijc', self._interp, self._grid[classes],
                      self._interp, optimize=True)
    img = np.clip(proto + noise, 0, 255).astype(np.uint8)
    return {'image': img, 'label': labels}

  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    local = _local_size(global_batch, process_count)
    step = start_step
    perms: dict[int, np.ndarray] = {}
    while True:
      slots = step * global_batch + process_index * local + np.arange(local)
      epoch = slots // self.num_examples
      pos = slots % self.num_examples
      index = np.empty_like(slots)
      for e in np.unique(epoch):
        if e not in perms:
          if len(perms) > 2:
            perms.clear()
          perms[e] = np.random.default_rng([self.shuffle_seed, 3, int(e)]).permutation(
              self.num_examples)
        sel = epoch == e
        index[sel] = perms[e][pos[sel]]
      yield self._images(index, epoch)
      step += 1

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    local = _local_size(global_batch, process_count)
    for start in range(0, self.num_examples, global_batch):
      slots = start + process_index * local + np.arange(local)
      mask = slots < self.num_examples
      index = np.where(mask, slots, 0)
      batch = self._images(index, np.zeros_like(index))
      batch['mask'] = mask
      yield batch

  def close(self) -> None:
    pass


def _local_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} does not split over '
                     f'{process_count} processes')
  return global_batch // process_count
