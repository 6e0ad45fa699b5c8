"""Import of the authors' PyTorch weights: names, layouts, refusals, the Orbax export, and (when
torch is installed) numerical agreement of every layer type with torch.nn's own layers."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.brats import get_config
from mstkd_jax import checkpoint as ckpt
from mstkd_jax import convert_torch as ct
from mstkd_jax.models import build

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_TSV = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'reference',
                             'network_state_dict.tsv')


def _reference_shapes():
  """{name: shape} of the authors' state_dict at the default size, from a TSV of `name<TAB>shape`
  lines (../shared/reference/network_state_dict.tsv relative to the repository, a layout used
  on the maintainers' machines; not part of the repository: the test skips without it)."""
  if not os.path.exists(REFERENCE_TSV):
    pytest.skip(f'{REFERENCE_TSV} not found')
  shapes = {}
  with open(REFERENCE_TSV) as f:
    for line in f:
      name, shape = line.rstrip('\n').split('\t')
      shapes[name] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
  return shapes


def _random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {n: (np.asarray(7, np.int64) if n.endswith('num_batches_tracked')
              else rng.standard_normal(s, dtype=np.float32)) for n, s in shapes.items()}


def _random_variables(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def tiny():
  config = get_config('tiny')
  abstract = build.network_struct(config)
  return config, abstract, _random_variables(abstract, seed=1)


# ---- (a) full size: every reference name, every shape ----

def test_full_size_mapping_matches_reference_names_and_our_tree():
  reference = _reference_shapes()
  assert len(reference) == 454
  abstract = build.network_struct(get_config())
  # The rules give exactly the reference names and shapes (a bijection onto the state_dict).
  assert ct.expected_torch_shapes(abstract) == reference
  names = ct.name_map(abstract)
  assert len(set(names.values())) == len(names) == 454 - 17  # 17 BatchNorm counters dropped

  state_dict = _random_state_dict(reference)
  variables = ct.from_torch_state_dict(state_dict, abstract)
  got, want = _flat(variables), _flat(abstract)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k

  # Layouts, element by element, on one entry of each kind.
  p = variables['params']
  w = state_dict['conv1a.weight']  # (O, I, kH, kW, kD)
  np.testing.assert_array_equal(p['conv1a']['kernel'][2, 0, 1, 3, 5], w[5, 3, 2, 0, 1])
  w = state_dict['Unetr.decoder9.block.0.block.weight']  # transposed conv (I, O, k, k, k)
  np.testing.assert_array_equal(p['Unetr']['decoder9']['deconv']['kernel'][1, 0, 1, 7, 300],
                                w[300, 7, 1, 0, 1])
  w = state_dict['Unetr.transformer.layer.4.mlp.w_1.weight']  # (out, in)
  np.testing.assert_array_equal(p['Unetr']['transformer']['layer_4']['w_1']['kernel'][10, 1000],
                                w[1000, 10])
  np.testing.assert_array_equal(
      variables['batch_stats']['Unetr']['decoder9_upsampler_1']['bn']['var'],
      state_dict['Unetr.decoder9_upsampler.1.block.1.running_var'])
  np.testing.assert_array_equal(
      p['Unetr']['transformer']['position_embeddings'],
      state_dict['Unetr.transformer.embeddings.position_embeddings'])

  # (b) torch -> ours -> torch is the identity (the counters come back as given).
  back = ct.to_torch_state_dict(variables, num_batches_tracked=7)
  assert back.keys() == state_dict.keys()
  for n, v in state_dict.items():
    assert back[n].dtype == v.dtype and back[n].shape == v.shape, n
    np.testing.assert_array_equal(back[n], v, err_msg=n)


# ---- (b) round trips at the tiny size ----

def test_ours_torch_ours_round_trip(tiny):
  _, abstract, variables = tiny
  sd = ct.to_torch_state_dict(variables)
  assert all(v.dtype == np.int64 and v.shape == () for n, v in sd.items()
             if n.endswith('num_batches_tracked'))
  again = ct.from_torch_state_dict(sd, abstract)
  for k, v in _flat(variables).items():
    np.testing.assert_array_equal(_flat(again)[k], v, err_msg=k)
  # A state_dict without the counters is accepted too.
  ct.from_torch_state_dict({n: v for n, v in sd.items() if 'num_batches' not in n}, abstract)


# ---- (c) refusals ----

def test_corrupted_state_dicts_are_refused_with_every_bad_entry(tiny):
  _, abstract, variables = tiny
  sd = ct.to_torch_state_dict(variables)
  del sd['conv2a.gn1.bias']
  del sd['Unetr.decoder0.1.block.1.running_mean']
  sd['Unetr.transformer.layer.0.mlp.fc3.weight'] = np.zeros((2, 2), np.float32)
  sd['extra'] = np.zeros(3, np.float32)
  sd['ds1.weight'] = np.zeros((1, 2, 3, 3, 3), np.float32)
  sd['Unetr.decoder3.1.block.0.block.weight'] = sd['Unetr.decoder3.1.block.0.block.weight'][:1]
  with pytest.raises(ct.StateDictMismatchError) as err:
    ct.from_torch_state_dict(sd, abstract)
  e, msg = err.value, str(err.value)
  assert e.missing == ['Unetr.decoder0.1.block.1.running_mean', 'conv2a.gn1.bias']
  assert e.unexpected == ['Unetr.transformer.layer.0.mlp.fc3.weight', 'extra']
  assert [m[0] for m in e.misshaped] == ['Unetr.decoder3.1.block.0.block.weight', 'ds1.weight']
  for name in ('conv2a.gn1.bias', 'running_mean', 'fc3.weight', 'extra', 'ds1.weight',
               '(1, 2, 3, 3, 3)', 'decoder3.1.block.0.block.weight'):
    assert name in msg


def test_position_embedding_of_another_input_size_gets_a_hint(tiny):
  _, abstract, variables = tiny
  sd = ct.to_torch_state_dict(variables)
  pos = 'Unetr.transformer.embeddings.position_embeddings'
  sd[pos] = sd[pos][:, :4]
  with pytest.raises(ct.StateDictMismatchError, match='input_shape'):
    ct.from_torch_state_dict(sd, abstract)


def test_whole_state_dict_of_another_module_is_refused(tiny):
  _, abstract, _ = tiny
  with pytest.raises(ct.StateDictMismatchError, match='No expected name'):
    ct.from_torch_state_dict({'model.conv.weight': np.zeros(3, np.float32)}, abstract)


# ---- Orbax export, checkpoint files, command line ----

def test_export_round_trip_and_refusal_with_another_config(tiny, tmp_path):
  config, abstract, variables = tiny
  src = tmp_path / 'tiny_state_dict.npz'
  np.savez(src, **ct.to_torch_state_dict(variables))
  out = ct.convert(src, config, tmp_path / 'export')
  assert sorted(os.listdir(out)) == ['config.json', 'manifest.json', 'variables']
  with open(os.path.join(out, 'manifest.json')) as f:
    assert json.load(f) == {'kind': 'network', 'network': 'student', 'source': str(src)}
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['model']['embed_dim'] == config.model.embed_dim

  for cfg in (config, None):  # None: the export's own config.json
    restored = ckpt.load_networks(cfg, out).primary()
    flat = _flat(restored)
    assert flat.keys() == _flat(abstract).keys()
    for k, v in _flat(variables).items():
      assert isinstance(flat[k], jax.Array) and flat[k].dtype == v.dtype
      np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)

  other = get_config('tiny')
  other.model.mlp_dim = 48
  # Another config than the export's: refused, naming the field.
  with pytest.raises(ValueError, match='model.mlp_dim'):
    ckpt.load_networks(other, out)
  # Weights that do not fit the export's own config.json: every difference listed.
  edited = tmp_path / 'edited'
  shutil.copytree(out, edited)
  with open(edited / 'config.json') as f:
    saved = json.load(f)
  saved['model']['mlp_dim'] = 48
  with open(edited / 'config.json', 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ckpt.NetworkMismatchError, match='w_1/kernel'):
    ckpt.load_networks(None, str(edited))
  with pytest.raises(FileExistsError):
    ct.convert(src, config, out)
  ct.convert(src, config, out, overwrite=True)


def test_training_checkpoint_npz_and_command_line(tiny, tmp_path):
  """A flattened whole checkpoint: --which picks model_full / model_missing."""
  config, abstract, variables = tiny
  teacher = jax.tree.map(lambda x: x + 1, variables)
  flat = {f'model_missing.{n}': v for n, v in ct.to_torch_state_dict(variables).items()}
  flat.update({f'model_full.{n}': v for n, v in ct.to_torch_state_dict(teacher).items()})
  src = tmp_path / 'model_last.npz'
  np.savez(src, **flat)
  sd = ct.load_state_dict_file(src, which='student')
  np.testing.assert_array_equal(sd['conv1a.bias'], variables['params']['conv1a']['bias'])

  out = tmp_path / 'teacher'
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'mstkd_jax.convert_torch', f'--state-dict={src}',
       '--config=configs/brats.py:tiny', '--out', str(out), '--which', 'teacher'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'manifest.json') as f:
    assert json.load(f)['network'] == 'teacher'
  restored = ckpt.load_networks(config, str(out)).networks['teacher']
  np.testing.assert_array_equal(np.asarray(restored['params']['conv1a']['bias']),
                                teacher['params']['conv1a']['bias'])
  np.testing.assert_array_equal(
      np.asarray(restored['batch_stats']['Unetr']['decoder9']['bn']['mean']),
      teacher['batch_stats']['Unetr']['decoder9']['bn']['mean'])


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail
  (tmp_path / 'weights.pth').write_bytes(b'PK')
  with pytest.raises(ImportError, match='pip install torch'):
    ct.load_state_dict_file(tmp_path / 'weights.pth')


# ---- (d) numerics against torch.nn, when torch is installed ----

def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('torch is not installed (an optional extra: pip install torch)')
  torch.manual_seed(0)
  torch.set_num_threads(1)
  return torch


def _to_ours(x):
  """torch (N, C, H, W, D) -> NumPy (N, H, W, D, C)."""
  return np.moveaxis(x.detach().numpy(), 1, -1)


def _variables_from_torch(module, our_prefix, torch_prefix, abstract):
  """Loads a torch module's state_dict into our variables of a sub-module through the
  converter, both placed at their place in the full network (our_prefix / torch_prefix)."""
  def nest(tree):
    for k in reversed(our_prefix):
      tree = {k: tree}
    return tree
  full = {c: nest(abstract[c]) for c in abstract}
  sd = {torch_prefix + n: v.detach().numpy() for n, v in module.state_dict().items()}
  variables = ct.from_torch_state_dict(sd, full)
  for k in our_prefix:
    variables = {c: variables[c][k] for c in variables}
  # and back: the converter's own export gives the same state_dict
  back = ct.to_torch_state_dict({c: nest(variables[c]) for c in variables})
  for n, v in sd.items():
    if not n.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[n], v, err_msg=n)
  return {c: v for c, v in variables.items() if v}


def _abstract(module, shape, **kwargs):
  """Our variables' shapes for ``module`` applied to an input of ``shape`` (no computation)."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape), **kwargs))


def _assert_close(ours, theirs, atol=1e-5):
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=atol)


def _randomise(module, torch):
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
    for name, b in module.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.randn_like(b))
      elif name.endswith('running_var'):
        b.copy_(torch.rand_like(b) + 0.5)
  return module


@pytest.mark.parametrize('stride,kernel,size', [(1, 3, (6, 5, 4)), (2, 3, (8, 6, 4)),
                                                (2, 3, (7, 5, 6)), (1, 1, (4, 4, 4))])
def test_conv_matches_torch(stride, kernel, size):
  torch = _torch()
  from mstkd_jax.models import layers
  ours = layers.conv(5, kernel, stride)
  theirs = _randomise(torch.nn.Conv3d(3, 5, kernel, stride=stride, padding=(kernel - 1) // 2),
                      torch)
  x = torch.randn(2, 3, *size)
  abstract = _abstract(ours, (1,) + size + (3,))
  v = _variables_from_torch(theirs, ('conv1a',), 'conv1a.', abstract)
  _assert_close(ours.apply(v, _to_ours(x)), _to_ours(theirs(x)))


def test_patch_embedding_and_token_order_match_torch():
  torch = _torch()
  import flax.linen as nn
  ours = nn.Conv(6, (2, 2, 2), strides=(2, 2, 2), padding='VALID')
  theirs = _randomise(torch.nn.Conv3d(3, 6, 2, stride=2), torch)
  x = torch.randn(2, 3, 4, 6, 8)
  abstract = _abstract(ours, (1, 4, 6, 8, 3))
  v = _variables_from_torch(theirs, ('ds1',), 'ds1.', abstract)
  y = ours.apply(v, _to_ours(x))
  tokens = np.asarray(y).reshape(2, -1, 6)  # our row-major flattening over (H, W, D)
  _assert_close(tokens, theirs(x).flatten(2).transpose(-1, -2).detach().numpy())


def test_deconv_matches_torch():
  torch = _torch()
  from mstkd_jax.models import layers
  ours = layers.deconv(5)
  theirs = _randomise(torch.nn.ConvTranspose3d(3, 5, 2, stride=2), torch)
  x = torch.randn(2, 3, 3, 4, 2)
  abstract = _abstract(ours, (1, 3, 4, 2, 3))
  v = _variables_from_torch(theirs, ('Unetr', 'decoder12_upsampler'),
                            'Unetr.decoder12_upsampler.block.', abstract)
  _assert_close(ours.apply(v, _to_ours(x)), _to_ours(theirs(x)))


def test_batchnorm_train_and_eval_match_torch():
  torch = _torch()
  from mstkd_jax.models import layers
  ours = layers.BatchNorm()
  theirs = _randomise(torch.nn.BatchNorm3d(4), torch)
  x = torch.randn(2, 4, 3, 5, 2) * 2 + 1
  abstract = _abstract(ours, (1, 3, 5, 2, 4), train=False)
  v = _variables_from_torch(theirs, ('bn',), 'bn.', abstract)
  # Evaluation: running statistics.
  theirs.eval()
  _assert_close(ours.apply(v, _to_ours(x), train=False), _to_ours(theirs(x)))
  # Training: batch statistics, and the running averages updated with the unbiased variance.
  theirs.train()
  y, updated = ours.apply(v, _to_ours(x), train=True, mutable=['batch_stats'])
  _assert_close(y, _to_ours(theirs(x)))
  _assert_close(updated['batch_stats']['mean'], theirs.running_mean.numpy())
  _assert_close(updated['batch_stats']['var'], theirs.running_var.numpy())


def test_groupnorm_layernorm_dense_match_torch():
  torch = _torch()
  import flax.linen as nn
  gn_t = _randomise(torch.nn.GroupNorm(4, 8), torch)
  gn = nn.GroupNorm(4, epsilon=1e-5)
  x = torch.randn(2, 8, 3, 4, 5) * 3 + 2
  abstract = _abstract(gn, (1, 3, 4, 5, 8))
  v = _variables_from_torch(gn_t, ('conv1b', 'gn1'), 'conv1b.gn1.', abstract)
  _assert_close(gn.apply(v, _to_ours(x)), _to_ours(gn_t(x)))

  ln_t = _randomise(torch.nn.LayerNorm(16, eps=1e-6), torch)
  ln = nn.LayerNorm(epsilon=1e-6)
  x = torch.randn(2, 7, 16) * 3 + 2
  abstract = _abstract(ln, (1, 7, 16))
  v = _variables_from_torch(ln_t, ('Unetr', 'transformer', 'encoder_norm'),
                            'Unetr.transformer.encoder_norm.', abstract)
  _assert_close(ln.apply(v, x.numpy()), ln_t(x).detach().numpy())

  fc_t = _randomise(torch.nn.Linear(16, 24), torch)
  fc = nn.Dense(24)
  abstract = _abstract(fc, (1, 16))
  v = _variables_from_torch(fc_t, ('Unetr', 'transformer', 'layer_0', 'w_1'),
                            'Unetr.transformer.layer.0.mlp.w_1.', abstract)
  _assert_close(fc.apply(v, x.numpy()), fc_t(x).detach().numpy())


def _torch_modules(torch):
  """Plain torch.nn versions of the blocks, with the authors' attribute names (the blocks of
  docs/method.md, "Network")."""
  nn = torch.nn

  class Wrap(nn.Module):  # SingleConv3DBlock / SingleDeconv3DBlock: the layer in `.block`
    def __init__(self, layer):
      super().__init__()
      self.block = layer

    def forward(self, x):
      return self.block(x)

  class ResBlock(nn.Module):
    def __init__(self, c, groups):
      super().__init__()
      self.gn1, self.gn2 = nn.GroupNorm(groups, c), nn.GroupNorm(groups, c)
      self.conv1, self.conv2 = nn.Conv3d(c, c, 3, padding=1), nn.Conv3d(c, c, 3, padding=1)

    def forward(self, x):
      y = self.conv1(torch.relu(self.gn1(x)))
      return x + self.conv2(torch.relu(self.gn2(y)))

  def conv_block(cin, cout, stride=1):
    return Wrap(nn.Sequential(Wrap(nn.Conv3d(cin, cout, 3, stride, 1)), nn.BatchNorm3d(cout),
                              nn.ReLU()))

  def deconv_block(cin, cout):
    return Wrap(nn.Sequential(Wrap(nn.ConvTranspose3d(cin, cout, 2, 2)),
                              Wrap(nn.Conv3d(cout, cout, 3, 1, 1)), nn.BatchNorm3d(cout),
                              nn.ReLU()))

  class Attention(nn.Module):
    def __init__(self, k, heads):
      super().__init__()
      self.heads = heads
      self.query, self.key, self.value, self.out = (nn.Linear(k, k) for _ in range(4))

    def forward(self, x):
      n, t, k = x.shape
      split = lambda y: y.view(n, t, self.heads, k // self.heads).permute(0, 2, 1, 3)
      q, kk, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
      probs = torch.softmax(q @ kk.transpose(-1, -2) / (k // self.heads) ** 0.5, dim=-1)
      y = (probs @ v).permute(0, 2, 1, 3).reshape(n, t, k)
      return self.out(y), probs

  class Mlp(nn.Module):
    def __init__(self, k, hidden):
      super().__init__()
      self.w_1, self.w_2 = nn.Linear(k, hidden), nn.Linear(hidden, k)

    def forward(self, x):
      return self.w_2(torch.relu(self.w_1(x)))

  class Block(nn.Module):
    def __init__(self, k, heads, hidden):
      super().__init__()
      self.attention_norm = nn.LayerNorm(k, eps=1e-6)
      self.mlp_norm = nn.LayerNorm(k, eps=1e-6)
      self.attn, self.mlp = Attention(k, heads), Mlp(k, hidden)

    def forward(self, x):
      h, probs = self.attn(self.attention_norm(x))
      x = x + h
      return x + self.mlp(self.mlp_norm(x)), probs

  return Wrap, ResBlock, conv_block, deconv_block, Block


def test_resblock_convblock_deconvblock_match_torch():
  torch = _torch()
  from mstkd_jax.models import layers
  _, ResBlock, conv_block, deconv_block, _ = _torch_modules(torch)

  theirs = _randomise(ResBlock(8, 4), torch)
  ours = layers.ResBlock(groups=4)
  x = torch.randn(2, 8, 4, 6, 4)
  abstract = _abstract(ours, (1, 4, 6, 4, 8))
  v = _variables_from_torch(theirs, ('conv4a',), 'conv4a.', abstract)
  _assert_close(ours.apply(v, _to_ours(x)), _to_ours(theirs(x)))

  for stride in (1, 2):
    theirs = _randomise(conv_block(8, 6, stride).block, torch)  # the Sequential itself
    ours = layers.ConvBlock(6, stride=stride)
    abstract = _abstract(ours, (1, 4, 6, 4, 8), train=False)
    v = _variables_from_torch(theirs, ('Unetr', 'decoder3_upsampler_1'),
                              'Unetr.decoder3_upsampler.1.block.', abstract)
    for train in (False, True):
      theirs.train(train)
      y = ours.apply(v, _to_ours(x), train=train, mutable=['batch_stats'])[0]
      _assert_close(y, _to_ours(theirs(x)))

  theirs = _randomise(deconv_block(8, 6).block, torch)
  ours = layers.DeconvBlock(6)
  abstract = _abstract(ours, (1, 4, 6, 4, 8), train=False)
  v = _variables_from_torch(theirs, ('Unetr', 'decoder6_1'), 'Unetr.decoder6.1.block.',
                            abstract)
  theirs.eval()
  _assert_close(ours.apply(v, _to_ours(x), train=False), _to_ours(theirs(x)))


def test_transformer_block_matches_torch():
  torch = _torch()
  from mstkd_jax.models.transformer import TransformerBlock
  *_, Block = _torch_modules(torch)
  theirs = _randomise(Block(32, 4, 48), torch).eval()
  ours = TransformerBlock(num_heads=4, mlp_dim=48, dropout=0.1, attention_dropout=0.1)
  x = torch.randn(2, 10, 32)
  abstract = _abstract(ours, (1, 10, 32), train=False)
  v = _variables_from_torch(theirs, ('Unetr', 'transformer', 'layer_7'),
                            'Unetr.transformer.layer.7.', abstract)
  y, probs = ours.apply(v, x.numpy(), train=False)
  y_t, probs_t = theirs(x)
  _assert_close(y, y_t.detach().numpy())
  _assert_close(probs, probs_t.detach().numpy())


def _torch_network(torch, config):
  """A plain torch.nn MST-KDNet written from docs/method.md, "Network" (generalised like ours
  to any patch size), with the authors' module names, so that its state_dict() has their
  names."""
  nn, F = torch.nn, torch.nn.functional
  Wrap, ResBlock, conv_block, deconv_block, Block = _torch_modules(torch)
  m = config.model
  c, g, k = m.init_channels, m.groups, m.embed_dim
  c0, c1, c2, c3, c4 = m.decoder_channels
  n_down = 4 - int(np.log2(m.patch_size))
  grid = tuple(s // 8 // m.patch_size for s in config.data.input_shape)

  class Embeddings(nn.Module):
    def __init__(self):
      super().__init__()
      p = m.patch_size
      self.patch_embeddings = nn.Conv3d(8 * c, k, p, stride=p)
      self.position_embeddings = nn.Parameter(torch.zeros(1, int(np.prod(grid)), k))

    def forward(self, x):
      return self.patch_embeddings(x).flatten(2).transpose(-1, -2) + self.position_embeddings

  class Transformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.embeddings = Embeddings()
      self.layer = nn.ModuleList(Block(k, m.num_heads, m.mlp_dim) for _ in range(m.num_layers))
      self.encoder_norm = nn.LayerNorm(k, eps=1e-6)  # owned, never applied

    def forward(self, x):
      h, hidden, probs = self.embeddings(x), [], []
      for i, layer in enumerate(self.layer):
        h, a = layer(h)
        if i + 1 in m.kept_blocks:
          hidden.append(h)
          probs.append(a)
      return hidden, probs

  class Unetr(nn.Module):
    def __init__(self):
      super().__init__()
      self.transformer = Transformer()
      self.decoder0 = nn.Sequential(conv_block(8 * c, c4), conv_block(c4, c3))
      self.decoder3 = nn.Sequential(deconv_block(k, c0), deconv_block(c0, c1),
                                    deconv_block(c1, c2))
      self.decoder6 = nn.Sequential(deconv_block(k, c0), deconv_block(c0, c1))
      self.decoder9 = deconv_block(k, c0)
      self.decoder12_upsampler = Wrap(nn.ConvTranspose3d(k, c0, 2, 2))
      self.decoder9_upsampler = nn.Sequential(
          conv_block(2 * c0, c0), conv_block(c0, c0), conv_block(c0, c0),
          Wrap(nn.ConvTranspose3d(c0, c1, 2, 2)))
      self.decoder6_upsampler = nn.Sequential(
          conv_block(2 * c1, c1), conv_block(c1, c1), Wrap(nn.ConvTranspose3d(c1, c2, 2, 2)))
      self.decoder3_upsampler = nn.Sequential(
          *[conv_block(2 * c2 if i == 0 else c2, c2, stride=2) for i in range(n_down)],
          Wrap(nn.ConvTranspose3d(c2, c3, 2, 2)))
      self.decoder0_header = nn.Sequential(conv_block(2 * c3, c3), conv_block(c3, c3),
                                           Wrap(nn.Conv3d(c3, 8 * c, 1)))

    def forward(self, x):
      hidden, probs = self.transformer(x)
      z3, z6, z9, z12 = (z.transpose(-1, -2).reshape(z.shape[0], k, *grid) for z in hidden)
      z12 = self.decoder12_upsampler(z12)
      z9 = self.decoder9_upsampler(torch.cat([self.decoder9(z9), z12], 1))
      z6 = self.decoder6_upsampler(torch.cat([self.decoder6(z6), z9], 1))
      z3 = self.decoder3_upsampler(torch.cat([self.decoder3(z3), z6], 1))
      y = self.decoder0_header(torch.cat([self.decoder0(x), z3], 1))
      return y, [z3, z6, z9, z12], probs

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      conv3 = lambda a, b, s=1: nn.Conv3d(a, b, 3, s, 1)
      self.conv1a, self.conv1b = conv3(m.in_channels, c), ResBlock(c, g)
      self.ds1, self.conv2a, self.conv2b = conv3(c, 2 * c, 2), ResBlock(2 * c, g), ResBlock(
          2 * c, g)
      self.ds2, self.conv3a, self.conv3b = conv3(2 * c, 4 * c, 2), ResBlock(
          4 * c, g), ResBlock(4 * c, g)
      self.ds3 = conv3(4 * c, 8 * c, 2)
      self.Unetr = Unetr()
      for name in ('conv4a', 'conv4b', 'conv4c', 'conv4d'):
        setattr(self, name, ResBlock(8 * c, g))
      self.up4conva, self.up4convb = nn.Conv3d(8 * c, 4 * c, 1), ResBlock(4 * c, g)
      self.up3conva, self.up3convb = nn.Conv3d(4 * c, 2 * c, 1), ResBlock(2 * c, g)
      self.up2conva, self.up2convb = nn.Conv3d(2 * c, c, 1), ResBlock(c, g)
      self.convc = nn.Conv3d(20 * c, 8 * c, 1)
      self.convco = nn.Conv3d(16 * c, 8 * c, 1)
      self.up1conv = nn.Conv3d(c, m.num_classes, 1)

    def forward(self, x):
      up = lambda y: F.interpolate(y, scale_factor=2, mode='nearest')
      c1 = self.conv1b(self.conv1a(x))
      c2 = self.conv2b(self.conv2a(self.ds1(c1)))
      c2d = self.ds2(c2)
      c3 = self.conv3b(self.conv3a(c2d))
      c3d = self.ds3(c3)
      t, features, probs = self.Unetr(c3d)
      t = t + c3d
      content = self.conv4d(self.conv4c(self.conv4b(self.conv4a(t))))
      style = self.convc(torch.cat([F.max_pool3d(c2d, 2), c3d, t], 1))
      fused = self.convco(torch.cat([style, content], 1))
      u = self.up4convb(up(self.up4conva(fused)) + c3)
      u = self.up3convb(up(self.up3conva(u)) + c2)
      u = self.up2convb(up(self.up2conva(u)) + c1)
      return dict(logits=self.up1conv(u), style=style, content=content, c3d=c3d,
                  features=features, attention=probs)

  return Net()


def test_whole_tiny_network_matches_a_torch_implementation():
  """torch -> ours on a whole (tiny) network: every output the losses use, in evaluation and
  in training mode (dropout off), and the BatchNorm running statistics after the step."""
  torch = _torch()
  from mstkd_jax.models.mstkdnet import network_from_config
  config = get_config('tiny')
  config.model.update(dropout=0.0, attention_dropout=0.0, fused_dropout=0.0)
  theirs = _torch_network(torch, config)
  with torch.no_grad():  # non-trivial norms, running statistics and position embedding
    for name, p in theirs.named_parameters():
      if name.endswith('position_embeddings'):
        p.copy_(torch.randn_like(p) * 0.5)
      elif p.ndim == 1 and not name.endswith('bias'):  # norms' scales
        p.add_(torch.randn_like(p) * 0.2)
    for name, b in theirs.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.randn_like(b) * 0.1)
      elif name.endswith('running_var'):
        b.copy_(torch.rand_like(b) + 0.5)
  sd = {n: v.detach().numpy().copy() for n, v in theirs.state_dict().items()}
  variables = ct.from_torch_state_dict(sd, build.network_struct(config))
  # Our export loads into a fresh torch network with strict name checking.
  _torch_network(torch, config).load_state_dict(
      {n: torch.from_numpy(v) for n, v in ct.to_torch_state_dict(variables).items()},
      strict=True)

  net = network_from_config(config)
  x = torch.rand(2, config.model.in_channels, *config.data.input_shape)
  apply = jax.jit(lambda v, x, train: net.apply(v, x, train=train, mutable=['batch_stats']),
                  static_argnums=2)

  def compare(ours, theirs_out):
    for name in ('logits', 'style', 'content', 'c3d'):
      _assert_close(getattr(ours, name), _to_ours(theirs_out[name]), atol=5e-5)
    for a, b in zip(ours.features, theirs_out['features']):
      _assert_close(a, _to_ours(b), atol=5e-5)
    for a, b in zip(ours.attention, theirs_out['attention']):
      _assert_close(a, b.detach().numpy(), atol=2e-5)

  for train in (False, True):
    theirs.train(train)
    with torch.no_grad():
      theirs_out = theirs(x)
    ours, updated = apply(variables, _to_ours(x), train)
    compare(ours, theirs_out)
  # After one training-mode pass both have updated their running statistics alike.
  new_sd = ct.to_torch_state_dict({'params': variables['params'], **updated})
  for n, v in theirs.state_dict().items():
    if n.endswith(('running_mean', 'running_var')):
      _assert_close(new_sd[n], v.numpy(), atol=1e-4)


def test_pth_state_dict_and_training_checkpoint(tiny, tmp_path):
  """torch.save'd files, read with weights_only: a state_dict, and a whole training checkpoint
  like the authors' (two networks, discriminator, optimiser, epoch, a NumPy Dice)."""
  torch = _torch()
  _, abstract, variables = tiny
  as_torch = lambda tree: {n: torch.from_numpy(v) for n, v in ct.to_torch_state_dict(tree).items()}
  teacher = jax.tree.map(lambda x: x * 2, variables)
  torch.save(as_torch(variables), tmp_path / 'net.pth')
  sd = ct.load_state_dict_file(tmp_path / 'net.pth')
  for k, v in _flat(ct.from_torch_state_dict(sd, abstract)).items():
    np.testing.assert_array_equal(v, _flat(variables)[k])

  disc = torch.nn.Conv3d(2, 1, 3)
  checkpoint = {'model_full': as_torch(teacher), 'model_missing': as_torch(variables),
                'd_style': disc.state_dict(),
                'optimizer': torch.optim.Adam(disc.parameters()).state_dict(),
                'epochs': 12, 'dice': np.float64(0.5)}
  torch.save(checkpoint, tmp_path / 'model_last.pth')
  for which, want in (('student', variables), ('teacher', teacher)):
    sd = ct.load_state_dict_file(tmp_path / 'model_last.pth', which=which)
    np.testing.assert_array_equal(sd['Unetr.decoder9.block.2.running_var'],
                                  want['batch_stats']['Unetr']['decoder9']['bn']['var'])
  with pytest.raises(KeyError, match='model_full'):
    del checkpoint['model_full']
    torch.save(checkpoint, tmp_path / 'student_only.pth')
    ct.load_state_dict_file(tmp_path / 'student_only.pth', which='teacher')
