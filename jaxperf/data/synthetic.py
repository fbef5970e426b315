"""A synthetic, learnable image-classification source with ImageNet's interface.

Each class has a fixed smooth colour pattern (its prototype); an example is its
class's prototype plus noise drawn from a bank of noise images, so the label is
a function of the image that a convnet can learn, and the task gets harder as
`noise` grows. Batches are deterministic in (seed, step) and the stream can
start at any step, exactly like the real readers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_BANK = 257  # noise images per split (prime, so strides cycle through all)


def _upsample(small: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour then a box blur: smooth prototypes of any size."""
  reps = -(-size // small.shape[1])
  big = small.repeat(reps, axis=1).repeat(reps, axis=2)[:, :size, :size]
  k = max(reps // 2, 1)
  out = big.astype(np.float32)
  for axis in (1, 2):
    out = sum(np.roll(out, s, axis=axis) for s in range(-k, k + 1)) / (2 * k + 1)
  return out


class SyntheticImages:
  """`num_examples` images of `image_size`^2 x 3 uint8 in `num_classes` classes."""

  def __init__(self, num_examples: int, num_classes: int, image_size: int, *,
               seed: int = 0, shuffle_seed: int | None = None,
               noise: float = 40.0, split: str = 'train'):
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
    grid = proto_rng.uniform(40, 215, (num_classes, 4, 4, 3)).astype(np.float32)
    self._protos = _upsample(grid, self.image_size)
    split_id = 1 if split == 'train' else 2
    bank_rng = np.random.default_rng([self.seed, split_id])
    self._bank = (bank_rng.standard_normal(
        (_BANK, self.image_size, self.image_size, 3)) * noise).astype(np.float32)
    self._labels = np.random.default_rng([self.seed, split_id, 7]).integers(
        0, num_classes, self.num_examples).astype(np.int32)

  def _images(self, index: np.ndarray, epoch: np.ndarray) -> dict[str, np.ndarray]:
    labels = self._labels[index]
    noise = self._bank[(index * 31 + epoch * 17) % _BANK]
    img = np.clip(self._protos[labels] + noise, 0, 255).astype(np.uint8)
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
