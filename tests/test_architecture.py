"""The layers of docs/architecture.md hold: no module imports a layer above its own.

  faces        main, run, predict (and its modules predict.*), visualize, convert_torch,
               data.prepare, evaluate_folder
  train | eval train, step, programs | evaluate, inference, prediction_policy, metrics, scoring,
               lesionwise(_brats2025), report, export, model_facts, subset_selection
  services     models.build, checkpoint, parallel
  foundations  models.*, losses, optim, modalities, data.*, native.*, and the utilities
               (logging_utils, fileio, host_memory, cli)

Every ``import`` in a module counts, at the top or inside a function. No two modules import
each other, directly or through others (an import loop), whatever their layers.
"""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'mstkd_jax')

FACES = {'main', 'run', 'predict', 'visualize', 'convert_torch', 'data.prepare',
         'evaluate_folder'}
TRAIN = {'train', 'step', 'programs'}
EVAL = {'evaluate', 'inference', 'prediction_policy', 'metrics', 'scoring', 'lesionwise',
        'lesionwise_brats2025', 'report', 'export', 'model_facts', 'subset_selection'}
SERVICES = {'models.build', 'checkpoint', 'parallel'}


def layer(module):
  if module in FACES or module.split('.')[0] in FACES:
    return 'face'
  if module in TRAIN:
    return 'train'
  if module in EVAL:
    return 'eval'
  if module in SERVICES:
    return 'service'
  return 'foundation'


# layer -> the layers it must not import
FORBIDDEN = {
    'train': {'eval', 'face'},
    'eval': {'train', 'face'},
    'service': {'train', 'eval', 'face'},
    'foundation': {'service', 'train', 'eval', 'face'},
    'face': set(),
}


def modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, '.')
        yield (rel[:-len('.__init__')] if rel.endswith('__init__') else rel), path


def imported(path, module):
  """The project modules (dotted, relative to mstkd_jax) that ``path`` imports."""
  with open(path) as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('mstkd_jax.'):
          out.add(alias.name[len('mstkd_jax.'):])
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'mstkd_jax':
        out.update(alias.name for alias in node.names)
      elif node.module.startswith('mstkd_jax.'):
        base = node.module[len('mstkd_jax.'):]
        known = {m for m, _ in modules()}
        if base in known:        # a package's __init__ runs first: it is imported too
          out.add(base)
        for alias in node.names:
          # ``from mstkd_jax.data import pipeline`` imports the module data.pipeline.
          candidate = f'{base}.{alias.name}'
          out.add(candidate if candidate in known else base)
  out.discard(module)
  return out


def test_no_module_imports_a_layer_above_its_own():
  arrows = []
  for module, path in modules():
    for target in imported(path, module):
      if layer(target) in FORBIDDEN[layer(module)]:
        arrows.append(f'{module} ({layer(module)}) -> {target} ({layer(target)})')
  assert not arrows, 'imports against the layers:\n' + '\n'.join(sorted(arrows))


def test_the_layer_table_names_existing_modules():
  known = {m for m, _ in modules()}
  for name in (FACES - {'evaluate_folder'}) | TRAIN | EVAL | SERVICES:
    assert name in known, name


def test_the_checker_sees_a_bad_arrow(tmp_path):
  """The parser finds both top-level and function-local imports."""
  path = tmp_path / 'x.py'
  path.write_text('from mstkd_jax import step\n'
                  'def f():\n  from mstkd_jax.data import pipeline\n  import mstkd_jax.evaluate\n')
  assert imported(str(path), 'x') == {'step', 'data', 'data.pipeline', 'evaluate'}


def import_graph(package_modules=None):
  """{module: the project modules it imports} (a package's ``__init__`` is the package)."""
  package_modules = dict(package_modules or modules())
  return {m: imported(path, m) & set(package_modules) for m, path in package_modules.items()}


def import_loops(graph):
  """Sorted 'a -> b -> ... -> a' cycles of ``graph`` (each found once, from its least member)."""
  loops = set()

  def walk(start, node, path):
    for nxt in sorted(graph.get(node, ())):
      if nxt == start:
        loops.add(' -> '.join(path + [start]))
      elif nxt > start and nxt not in path:
        walk(start, nxt, path + [nxt])

  for start in sorted(graph):
    walk(start, start, [start])
  return sorted(loops)


def test_no_import_loops():
  loops = import_loops(import_graph())
  assert not loops, 'import loops:\n' + '\n'.join(loops)


def test_the_loop_checker_sees_a_loop(tmp_path):
  """Two modules importing each other (one of them inside a function) are a loop, and so is a
  package whose module imports from the package; a package importing its module is not."""
  (tmp_path / 'a.py').write_text('from mstkd_jax import b\n')
  (tmp_path / 'b.py').write_text('def f():\n  from mstkd_jax import a\n')
  (tmp_path / 'c.py').write_text('from mstkd_jax import a\n')
  graph = import_graph({m: str(tmp_path / f'{m}.py') for m in ('a', 'b', 'c')})
  assert import_loops(graph) == ['a -> b -> a']
  assert import_loops({'p': {'p.x'}, 'p.x': set()}) == []
  (tmp_path / 'x.py').write_text('from mstkd_jax.p import y\n')
  graph = import_graph({'p': str(tmp_path / 'c.py'), 'p.x': str(tmp_path / 'x.py'),
                        'p.y': str(tmp_path / 'c.py')})
  assert 'p' in graph['p.x']
