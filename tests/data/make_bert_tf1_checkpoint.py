"""Writes tests/data/bert_tf1/: a tiny BERT checkpoint in TensorFlow 1 format.

The variables carry exactly the names the MLPerf reference (the original
BERT modeling.py and run_pretraining.py) gives them, in its layouts (dense
kernels [in, out], cls/seq_relationship/output_weights [2, hidden]), plus
what its optimizer and training loop save beside them: adam_m and adam_v for
every variable and global_step. The values are random (numpy, seed 0), so
reference_tensors() recomputes them without TensorFlow and the tests compare
what jaxperf.interop reads with them.

Run with TensorFlow installed (any 2.x; TF1 graph mode through
tf.compat.v1):

    python tests/data/make_bert_tf1_checkpoint.py [OUT_DIR]

Only reference_tensors() and its constants are used by the tests; this file
imports nothing from jaxperf, so it runs where only TensorFlow is installed.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# The tiny configuration (bert_config.json's fields).
VOCAB_SIZE = 16
HIDDEN_SIZE = 4
NUM_LAYERS = 2
NUM_HEADS = 2
INTERMEDIATE_SIZE = 8
MAX_POSITION = 8
TYPE_VOCAB_SIZE = 2
GLOBAL_STEP = 7
PREFIX = f'model.ckpt-{GLOBAL_STEP}'


def variable_shapes() -> list[tuple[str, tuple[int, ...]]]:
  """The reference's trainable variables and their shapes, in its order."""
  v, h, f = VOCAB_SIZE, HIDDEN_SIZE, INTERMEDIATE_SIZE
  out = [('bert/embeddings/word_embeddings', (v, h)),
         ('bert/embeddings/token_type_embeddings', (TYPE_VOCAB_SIZE, h)),
         ('bert/embeddings/position_embeddings', (MAX_POSITION, h)),
         ('bert/embeddings/LayerNorm/beta', (h,)),
         ('bert/embeddings/LayerNorm/gamma', (h,))]
  for i in range(NUM_LAYERS):
    p = f'bert/encoder/layer_{i}'
    for proj in ('query', 'key', 'value'):
      out += [(f'{p}/attention/self/{proj}/kernel', (h, h)),
              (f'{p}/attention/self/{proj}/bias', (h,))]
    out += [(f'{p}/attention/output/dense/kernel', (h, h)),
            (f'{p}/attention/output/dense/bias', (h,)),
            (f'{p}/attention/output/LayerNorm/beta', (h,)),
            (f'{p}/attention/output/LayerNorm/gamma', (h,)),
            (f'{p}/intermediate/dense/kernel', (h, f)),
            (f'{p}/intermediate/dense/bias', (f,)),
            (f'{p}/output/dense/kernel', (f, h)),
            (f'{p}/output/dense/bias', (h,)),
            (f'{p}/output/LayerNorm/beta', (h,)),
            (f'{p}/output/LayerNorm/gamma', (h,))]
  out += [('bert/pooler/dense/kernel', (h, h)),
          ('bert/pooler/dense/bias', (h,)),
          ('cls/predictions/transform/dense/kernel', (h, h)),
          ('cls/predictions/transform/dense/bias', (h,)),
          ('cls/predictions/transform/LayerNorm/beta', (h,)),
          ('cls/predictions/transform/LayerNorm/gamma', (h,)),
          ('cls/predictions/output_bias', (v,)),
          ('cls/seq_relationship/output_weights', (2, h)),
          ('cls/seq_relationship/output_bias', (2,))]
  return out


def reference_tensors() -> dict[str, np.ndarray]:
  """Every tensor the checkpoint holds, by name (float32, global_step int64)."""
  rng = np.random.default_rng(0)
  out = {}
  for name, shape in variable_shapes():
    out[name] = rng.standard_normal(shape).astype(np.float32)
    out[f'{name}/adam_m'] = rng.standard_normal(shape).astype(np.float32)
    out[f'{name}/adam_v'] = rng.uniform(0, 1, shape).astype(np.float32)
  out['global_step'] = np.asarray(GLOBAL_STEP, np.int64)
  return out


def main(out_dir: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf1 = tf.compat.v1
  os.makedirs(out_dir, exist_ok=True)
  with tf.Graph().as_default():
    variables = [
        tf1.get_variable(name, initializer=tf.constant(value), trainable=False)
        for name, value in reference_tensors().items()]
    saver = tf1.train.Saver(variables)
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      saver.save(sess, os.path.join(out_dir, PREFIX),
                 write_meta_graph=False, write_state=True)
  # The state file records absolute paths; keep it relative to out_dir.
  with open(os.path.join(out_dir, 'checkpoint'), 'w') as f:
    f.write(f'model_checkpoint_path: "{PREFIX}"\n'
            f'all_model_checkpoint_paths: "{PREFIX}"\n')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else
       os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bert_tf1'))
