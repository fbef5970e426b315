"""3D U-Net loss and DICE metric against PyTorch versions of the reference's.

The torch functions below restate the semantics of the reference's Dice,
DiceCELoss and DiceScore (image_segmentation/pytorch/model/losses.py) in its
NCDHW layout; ours are channels-last.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxperf import losses, metrics

SMOOTH = 1e-6


# --- PyTorch versions of the reference (NCDHW) --------------------------------
def torch_onehot(ids, num_classes=3):
  """[B, 1, D, H, W] or [B, D, H, W] ids -> float [B, C, D, H, W]."""
  if ids.dim() == 5:
    ids = ids[:, 0]
  return F.one_hot(ids.long(), num_classes).permute(0, 4, 1, 2, 3).float()


def torch_dice(pred, target, *, softmax, argmax, include_background=False):
  """Per sample and class Dice, [B, C'] (the reference's Dice.__call__)."""
  if softmax:
    pred = torch.softmax(pred, dim=1)
  elif argmax:
    pred = torch_onehot(torch.argmax(pred, dim=1), pred.shape[1])
  target = torch_onehot(target, pred.shape[1])
  if not include_background:
    pred, target = pred[:, 1:], target[:, 1:]
  axes = [2, 3, 4]
  inter = torch.sum(pred * target, dim=axes)
  return (2.0 * inter + SMOOTH) / (torch.sum(target, dim=axes)
                                   + torch.sum(pred, dim=axes) + SMOOTH)


def torch_dice_ce_loss(logits, labels, include_background=False):
  ce = F.cross_entropy(logits, labels[:, 0].long())
  dice = torch.mean(1.0 - torch_dice(logits, labels, softmax=True,
                                     argmax=False,
                                     include_background=include_background))
  return (dice + ce) / 2


def torch_dice_score(logits, labels, include_background=False):
  return torch.mean(torch_dice(logits, labels, softmax=False, argmax=True,
                               include_background=include_background), dim=0)


# --- helpers ------------------------------------------------------------------
def random_case(seed, batch=2, spatial=(6, 7, 5), classes=3, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((batch, *spatial, classes))
            ).astype(np.float32)
  labels = rng.integers(0, classes, (batch, *spatial)).astype(np.int32)
  return logits, labels


def to_ncdhw(logits, labels):
  return (torch.from_numpy(np.moveaxis(logits, -1, 1).copy()),
          torch.from_numpy(labels[:, None].astype(np.int64)))


# --- loss ---------------------------------------------------------------------
@pytest.mark.parametrize('include_background', [False, True])
@pytest.mark.parametrize('seed,scale', [(0, 1.0), (1, 4.0), (2, 12.0)])
def test_loss_and_grad_match_torch(seed, scale, include_background):
  logits, labels = random_case(seed, scale=scale)
  loss_fn = lambda x: losses.dice_ce_loss(
      x, labels, include_background=include_background)
  ours, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits))

  t_logits, t_labels = to_ncdhw(logits, labels)
  t_logits.requires_grad_(True)
  ref = torch_dice_ce_loss(t_logits, t_labels, include_background)
  ref.backward()
  ref_grad = np.moveaxis(t_logits.grad.numpy(), 1, -1)

  assert ours.dtype == jnp.float32 and ours.shape == ()
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-6, atol=1e-7)
  scale_g = np.abs(ref_grad).max()
  assert scale_g > 0
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=0,
                             atol=1e-6 * scale_g)


def test_loss_sparse_classes_match_torch():
  """Mostly background, as KiTS19 crops are: small foreground sums."""
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((3, 8, 8, 8, 3)).astype(np.float32)
  logits[..., 0] += 4.0
  labels = np.zeros((3, 8, 8, 8), np.int32)
  labels[0, 2:4, 2:4, 2:4] = 1
  labels[1, 5, 5, 5] = 2          # sample 2: no foreground at all
  ours, grad = jax.value_and_grad(
      lambda x: losses.dice_ce_loss(x, labels))(jnp.asarray(logits))
  t_logits, t_labels = to_ncdhw(logits, labels)
  t_logits.requires_grad_(True)
  ref = torch_dice_ce_loss(t_logits, t_labels)
  ref.backward()
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad),
                             np.moveaxis(t_logits.grad.numpy(), 1, -1),
                             rtol=0, atol=1e-6 * t_logits.grad.abs().max())


def test_soft_dice_scores_match_torch():
  logits, labels = random_case(4, batch=3)
  ours = losses.dice_scores(jnp.asarray(logits), labels)
  t_logits, t_labels = to_ncdhw(logits, labels)
  ref = torch_dice(t_logits, t_labels, softmax=True, argmax=False)
  assert ours.shape == (3, 2)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
  both = losses.dice_scores(jnp.asarray(logits), labels,
                            include_background=True)
  assert both.shape == (3, 3)
  np.testing.assert_allclose(np.asarray(both[:, 1:]), np.asarray(ours),
                             rtol=1e-7)


def test_loss_bfloat16_logits():
  logits, labels = random_case(5)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  loss, grad = jax.value_and_grad(
      lambda x: losses.dice_ce_loss(x, labels))(bf16)
  assert loss.dtype == jnp.float32
  assert grad.dtype == jnp.bfloat16
  # Same as float32 logits holding the bfloat16 values.
  as_f32 = np.asarray(bf16.astype(jnp.float32))
  t_logits, t_labels = to_ncdhw(as_f32, labels)
  ref = torch_dice_ce_loss(t_logits, t_labels)
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_loss_perfect_prediction_near_zero():
  _, labels = random_case(6)
  logits = 50.0 * np.asarray(jax.nn.one_hot(labels, 3))
  loss = float(losses.dice_ce_loss(jnp.asarray(logits), labels))
  assert 0.0 <= loss < 1e-6


def test_loss_wrong_class_count_raises():
  logits, labels = random_case(7, classes=4)
  with pytest.raises(ValueError, match='num_classes'):
    losses.dice_ce_loss(jnp.asarray(logits), labels, num_classes=3)


def test_loss_spatially_sharded_matches_unsharded():
  devices = np.array(jax.devices()[:4])
  if devices.size < 4:
    pytest.skip('needs 4 devices')
  mesh = Mesh(devices.reshape(2, 2), ('data', 'space'))
  logits, labels = random_case(8, batch=2, spatial=(8, 6, 4))
  sh_x = NamedSharding(mesh, P('data', 'space', None, None, None))
  sh_y = NamedSharding(mesh, P('data', 'space', None, None))
  x = jax.device_put(jnp.asarray(logits), sh_x)
  y = jax.device_put(jnp.asarray(labels), sh_y)
  fn = jax.jit(jax.value_and_grad(losses.dice_ce_loss))
  loss, grad = fn(x, y)
  loss0, grad0 = jax.jit(jax.value_and_grad(losses.dice_ce_loss))(
      jnp.asarray(logits), jnp.asarray(labels))
  assert grad.sharding.is_equivalent_to(sh_x, 5)
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(grad0), rtol=1e-5,
                             atol=1e-9)


# --- DICE metric --------------------------------------------------------------
@pytest.mark.parametrize('as_jax', [False, True])
def test_dice_from_logits_matches_torch(as_jax):
  logits, labels = random_case(9, batch=4, spatial=(5, 6, 7), scale=1.0)
  # Shift the odds so that the classes have different sizes.
  logits[..., 0] += 0.7
  args = ((jnp.asarray(logits), jnp.asarray(labels)) if as_jax
          else (logits, labels))
  per_case = metrics.dice(*args)
  assert isinstance(per_case, jax.Array if as_jax else np.ndarray)
  assert per_case.shape == (4, 2) and per_case.dtype == np.float32
  t_logits, t_labels = to_ncdhw(logits, labels)
  ref_cases = torch_dice(t_logits, t_labels, softmax=False, argmax=True)
  np.testing.assert_allclose(np.asarray(per_case), ref_cases.numpy(),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(per_case).mean(0),
                             torch_dice_score(t_logits, t_labels).numpy(),
                             rtol=1e-6)
  # One case at a time gives the rows.
  one = metrics.dice(logits[2], labels[2])
  assert one.shape == (2,)
  np.testing.assert_allclose(one, ref_cases[2].numpy(), rtol=1e-6)


def test_dice_integer_predictions_and_background():
  logits, labels = random_case(10, batch=1, spatial=(9, 8, 7), scale=1.0)
  pred = np.argmax(logits, -1)
  from_ids = metrics.dice(pred[0], labels[0], include_background=True)
  from_logits = metrics.dice(logits[0], labels[0], include_background=True)
  t_logits, t_labels = to_ncdhw(logits, labels)
  ref = torch_dice(t_logits, t_labels, softmax=False, argmax=True,
                   include_background=True)[0].numpy()
  assert from_ids.shape == (3,)
  np.testing.assert_allclose(from_ids, ref, rtol=1e-6)
  np.testing.assert_array_equal(from_ids, from_logits)
  # Without the background: the foreground entries only.
  np.testing.assert_array_equal(metrics.dice(pred[0], labels[0]),
                                from_ids[1:])


def test_dice_perfect_absent_and_disjoint():
  labels = np.zeros((6, 6, 6), np.int32)
  labels[1:3, 1:3, 1:3] = 1
  np.testing.assert_array_equal(metrics.dice(labels, labels), [1.0, 1.0])
  # Class 2 absent from prediction and label: 1 by the smoothing.
  pred = labels.copy()
  pred[1, 1, 1] = 0
  scores = metrics.dice(pred, labels)
  np.testing.assert_allclose(scores, [2 * 7 / (8 + 7), 1.0], rtol=1e-6)
  # Predicted where the label has none: 1e-6 / (n + 1e-6).
  pred = labels.copy()
  pred[5, 5, 5] = 2
  np.testing.assert_allclose(metrics.dice(pred, labels)[1], 1e-6 / 1.000001,
                             rtol=1e-5)
  # A wrong background does not count in the default scores.
  pred = labels.copy()
  pred[0, 0, 0] = 1
  labels_bg = labels.copy()
  assert metrics.dice(pred, labels_bg)[0] < 1.0
  np.testing.assert_allclose(
      metrics.dice(pred, labels_bg, include_background=True)[0],
      2 * 207 / (208 + 207), rtol=1e-6)


def test_dice_jit():
  logits, labels = random_case(11, batch=2, scale=1.0)
  fn = jax.jit(lambda x, y: metrics.dice(x, y))
  np.testing.assert_allclose(np.asarray(fn(logits, labels)),
                             metrics.dice(logits, labels), rtol=1e-6)


def test_dice_shape_mismatch_raises():
  with pytest.raises(ValueError, match='shape'):
    metrics.dice(np.zeros((4, 4, 5), np.int32), np.zeros((4, 4, 4), np.int32))
