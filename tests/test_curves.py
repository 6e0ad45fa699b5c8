"""The learning-curve figure a training run leaves in its workdir (``curves.png``)."""

import json

import numpy as np

from mstkd_jax import visualize


def test_moving_average_is_a_trailing_mean_that_skips_nans():
  got = visualize.moving_average([1.0, 3.0, float('nan'), 5.0, 7.0], 2)
  np.testing.assert_allclose(got, [1.0, 2.0, 3.0, 5.0, 6.0])
  assert np.isnan(visualize.moving_average([float('nan')], 3)[0])
  np.testing.assert_allclose(visualize.moving_average([4.0, 2.0], 1), [4.0, 2.0])


def test_learning_curves_draws_loss_and_validation_dice(tmp_path):
  """From a metrics.jsonl as the training loop writes it (training lines, validation lines, a
  replayed line after a resume, a torn last line): a PNG; None without metrics."""
  assert visualize.learning_curves(str(tmp_path)) is None
  lines = [json.dumps({'step': s, 'total': 3.0 - s / 100, 'dice': 2.0 - s / 100})
           for s in range(1, 101)]
  lines += [json.dumps({'step': s, 'val_dice': s / 200, 'val_teacher_dice': s / 150})
            for s in (50, 100)]
  lines += [json.dumps({'step': 100, 'total': 99.0, 'replayed': True}), '{"step": 101, "tot']
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines))
  out = visualize.learning_curves(str(tmp_path))
  assert out == str(tmp_path / 'curves.png')
  assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
