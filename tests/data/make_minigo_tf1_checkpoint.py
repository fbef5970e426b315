"""Writes tests/data/minigo_tf1/: a tiny MiniGo network in TensorFlow 1 form.

The network is built as the MLPerf reference's dual_net.py builds its
inference graph (model_inference_fn: tf.layers conv2d / batch_normalization /
dense in NHWC, no convolution biases, batch norms with momentum 0.95 and
epsilon 1e-5, the heads' batch norms without scale or offset), so TensorFlow
names the variables as it names the reference's (conv2d, conv2d_1, ...,
batch_normalization_k, dense, dense_1, dense_2). The MomentumOptimizer the
reference trains with adds its slots (…/Momentum) and global_step. The
weights and the batch norms' moving statistics are random (numpy, seed 0);
the checkpoint is saved under the prefix `target`, as the reference's target
model (ml_perf/target/target.*), without the .meta graph.

Beside it, outputs.npz holds a batch of boolean input planes and the policy
(softmax), logits and value TensorFlow computes for them in inference mode,
which the tests compare with models/minigo.py on the imported weights.

Run with TensorFlow 2.x and tf_keras installed (tf.compat.v1.layers needs
the Keras 2 implementation):

    TF_USE_LEGACY_KERAS=1 python tests/data/make_minigo_tf1_checkpoint.py [OUT]

This file imports nothing from jaxperf, so it runs where only TensorFlow is.
"""

from __future__ import annotations

import os
import sys

import numpy as np

BOARD_SIZE = 9
INPUT_PLANES = 13
CONV_WIDTH = 8
FC_WIDTH = 4
TRUNK_LAYERS = 2
POLICY_CONV_WIDTH = 2
VALUE_CONV_WIDTH = 1
GLOBAL_STEP = 7
PREFIX = 'target'
BATCH = 4


def main(out_dir: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf1 = tf.compat.v1
  tf1.disable_eager_execution()
  n = BOARD_SIZE
  graph = tf.Graph()
  with graph.as_default():
    features = tf1.placeholder(tf.bool, [None, n, n, INPUT_PLANES],
                               name='pos_tensor')
    x = tf.cast(features, tf.float32)

    def batchn(t, **kw):
      return tf1.layers.batch_normalization(
          t, axis=-1, momentum=0.95, epsilon=1e-5, fused=True,
          training=False, **{'center': True, 'scale': True, **kw})

    def conv(t, filters=CONV_WIDTH, kernel_size=3):
      return tf1.layers.conv2d(t, filters=filters, kernel_size=kernel_size,
                               padding='same', use_bias=False,
                               data_format='channels_last')

    h = tf.nn.relu(batchn(conv(x)))
    for _ in range(TRUNK_LAYERS):
      r = tf.nn.relu(batchn(conv(h)))
      r = batchn(conv(r))
      h = tf.nn.relu(h + r)
    p = tf.nn.relu(batchn(conv(h, POLICY_CONV_WIDTH, 1), center=False,
                          scale=False))
    logits = tf1.layers.dense(tf.reshape(p, [-1, POLICY_CONV_WIDTH * n * n]),
                              n * n + 1)
    policy = tf.nn.softmax(logits, name='policy_output')
    v = tf.nn.relu(batchn(conv(h, VALUE_CONV_WIDTH, 1), center=False,
                          scale=False))
    v = tf.nn.relu(tf1.layers.dense(
        tf.reshape(v, [-1, VALUE_CONV_WIDTH * n * n]), FC_WIDTH))
    value = tf.nn.tanh(tf.reshape(tf1.layers.dense(v, 1), [-1]),
                       name='value_output')

    # What the reference's training adds to the checkpoint.
    step = tf1.train.get_or_create_global_step()
    loss = tf.reduce_mean(logits) + tf.reduce_mean(value)
    tf1.train.MomentumOptimizer(0.1, 0.9).minimize(loss, global_step=step)
    model_vars = [t for t in tf1.global_variables()
                  if not t.op.name.endswith('Momentum')
                  and t.op.name != 'global_step']
    slots = [t for t in tf1.global_variables()
             if t.op.name.endswith('Momentum')]

    rng = np.random.default_rng(0)
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      for t in model_vars + slots:
        shape = t.shape.as_list()
        if t.op.name.endswith('moving_variance') or t.op.name.endswith(
            'gamma'):
          value_ = rng.uniform(0.5, 1.5, shape)
        else:
          value_ = rng.normal(0.0, 0.3, shape)
        t.load(value_.astype(np.float32), sess)
      step.load(GLOBAL_STEP, sess)
      planes = rng.random((BATCH, n, n, INPUT_PLANES)) < 0.4
      out = sess.run({'policy': policy, 'logits': logits, 'value': value},
                     {features: planes})
      os.makedirs(out_dir, exist_ok=True)
      tf1.train.Saver().save(sess, os.path.join(out_dir, PREFIX),
                             write_meta_graph=False)
      os.remove(os.path.join(out_dir, 'checkpoint'))   # absolute paths
      np.savez(os.path.join(out_dir, 'outputs.npz'), planes=planes, **out)
      print('variables:', ', '.join(t.op.name for t in model_vars))


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else
       os.path.join(os.path.dirname(os.path.abspath(__file__)), 'minigo_tf1'))
