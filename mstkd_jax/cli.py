"""What every command line of the project shares: flag spelling, one-line errors, exit codes.

Exit status: 0 done; 2 a usage or input error (a bad flag, config field, file, data folder,
a folder in use by another job), reported as one line ``error: ...`` on stderr with no
traceback (``MSTKD_TRACEBACK=1`` shows it); 4 an output could not be written (a full disk or
quota, a failed checkpoint save; the line says how much space is free); 128 + signal when
SIGTERM or SIGINT stopped the command (the line says what was interrupted and what is
complete); other statuses are the command's own (main.py: 3 non-finite loss).
"""

import contextlib
import os
import re
import shutil
import signal
import sys

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from mstkd_jax import configs

USAGE_ERROR = 2
WRITE_ERROR = 4


class InputError(Exception):
  """A problem with what the user gave (a file, a folder, a value): one line, exit 2."""


class Interrupted(BaseException):
  """SIGTERM or SIGINT arrived (``raise_on_signals``); exit status 128 + ``signum``. A
  BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

  def __init__(self, signum):
    super().__init__(signum)
    self.signum = signum
    self.name = signal.Signals(signum).name
    self.status = 128 + signum


@contextlib.contextmanager
def raise_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
  """Inside the block SIGTERM and SIGINT raise ``Interrupted`` in the main thread, so that
  the command unwinds (locks released, temporary files removed) and can say what was
  interrupted, instead of dying without a word. Handlers installed inside the block (the
  training loop's) take precedence while they are installed."""
  def handle(signum, frame):
    del frame
    raise Interrupted(signum)

  previous = {}
  for signum in signums:
    try:
      previous[signum] = signal.signal(signum, handle)
    except ValueError:   # not the main thread
      pass
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def underscore_flags(argv):
  """Lets users spell absl flags with dashes: ``--params-only`` -> ``--params_only``,
  ``--state-dict=F`` -> ``--state_dict=F``. Values and ``--config.*`` overrides are untouched."""
  out = []
  for arg in argv:
    if arg.startswith('--') and not arg.startswith('--config'):
      name, sep, value = arg[2:].partition('=')
      arg = '--' + name.replace('-', '_') + sep + value
    out.append(arg)
  return out


def show_tracebacks():
  return os.environ.get('MSTKD_TRACEBACK', '') not in ('', '0')


def one_line(error: BaseException) -> str:
  """The message of an error without the chained repr noise (KeyError quotes, config_dict's
  nested AttributeError text)."""
  text = str(error.args[0]) if len(error.args) == 1 else str(error)
  if isinstance(error, KeyError) and text.startswith("'") and text.endswith("'"):
    text = text[1:-1]
  text = text.replace("\\n", "\n").replace("\\'", "'").replace("'\n", "' ")
  text = " ".join(text.split())
  return text.strip("\" ") or type(error).__name__


def fail(message, status=USAGE_ERROR):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv):
  """absl's flag parser, with one line and exit 2 for any problem of a flag or of the config
  file and its overrides (ml_collections raises plain exceptions for those)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if show_tracebacks():
      raise
    fail(describe_flag_error(e, argv))


_CONFIG_FLAGS = set()   # names of the config flags defined by define_config_flag


def define_config_flag(name='config', default=None, help_string=None):
  """``--config``: a packaged config by name (``brats:tiny``, see ``mstkd_jax.configs``) or a
  Python file (``configs/brats.py:tiny``), with ``--config.<field>=value`` overrides."""
  help_string = help_string or ('A config: ' + configs.CONFIG_HELP + '. Fields are overridden '
                                'with --config.<field>=value, e.g. --config.train.epochs=10.')
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
  _CONFIG_FLAGS.add(name)
  flag = flags.FLAGS[name]
  flag.parser = _NamedConfigParser(flag.parser)
  if default is not None:
    flags.FLAGS.set_default(name, default)
  return holder


class _NamedConfigParser(flags.ArgumentParser):
  """ml_collections' config-file parser, taking a packaged config's name for its file."""

  def __init__(self, file_parser):
    self.file_parser = file_parser

  def parse(self, argument):
    return self.file_parser.parse(configs.resolve(argument))

  def flag_type(self):
    return self.file_parser.flag_type()


def config_flag(name='config'):
  """The value of a ``config_flags`` flag (None when not given). ml_collections loads the file
  and applies the ``--config.*`` overrides on first access; their problems become one line and
  exit 2, as does an override of the wrong type."""
  try:
    value = getattr(flags.FLAGS, name)
    if value is None:
      return None
    # A file that failed to load comes back as a stand-in that raises on first use.
    value.keys()
  except Exception as e:  # pylint: disable=broad-except
    if show_tracebacks():
      raise
    fail(f'--{name}: {describe_config_error(e)}')
  problem = override_type_problem(name)
  if problem:
    fail(problem)
  return value


def override_type_problem(name='config'):
  """A message when an override of a tuple field holds values of another type than the
  field's (``--config.data.input_shape=abc``; ml_collections checks only scalar fields)."""
  flag = flags.FLAGS[name]
  overrides = getattr(flag, 'override_values', None) or {}
  if not overrides:
    return None
  defaults = flag.parser.parse(flag.config_filename)
  for path, value in overrides.items():
    try:
      default = config_path.get_value(path, defaults)
    except (KeyError, AttributeError):
      continue
    if not (isinstance(default, tuple) and default and isinstance(value, tuple)):
      continue
    kinds = {type(v) for v in default}
    numbers = kinds <= {int, float}
    if numbers:
      wrong = [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float))
               or (kinds == {int} and not isinstance(v, int))]
    else:
      wrong = [v for v in value if type(v) not in kinds]
    if wrong:
      names = ' or '.join(sorted(k.__name__ for k in kinds))
      example = ','.join(str(v) for v in default)
      return (f'--{name}.{path}: {path} takes a tuple of {names}, e.g. '
              f'--{name}.{path}={example} (got {value!r})')
  return None


def describe_flag_error(error, argv=(), flag_values=None):
  """One line for an error of absl's parser or of a config override: an unknown flag (with
  absl's suggestions), a value of the wrong type (naming the field and the type it takes), an
  unknown config field (its full path), or a config file that cannot be loaded."""
  if isinstance(error, flags.UnrecognizedFlagError):
    return unknown_flag_message(error)
  if isinstance(error, flags.IllegalFlagValueError):
    return bad_value_message(error, flags.FLAGS if flag_values is None else flag_values)
  field = unknown_field_message(error, argv)
  return field or describe_config_error(error)


def unknown_flag_message(error):
  name = error.flagname
  text = str(error)
  hint = re.search(r'Did you mean: (.+?)\s*\?', text)
  message = f'unknown flag --{name}'
  if hint:
    guesses = [g.strip() for g in hint.group(1).split(',') if g.strip()]
    message += '; did you mean ' + ' or '.join(f'--{g}' for g in guesses) + '?'
  return message + ' (--help lists the flags)'


_TYPE_WORDS = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false',
               'tuple': 'a tuple (1,2,3)', 'string': 'a string'}


def bad_value_message(error, flag_values):
  """``--config.train.epochs=abc: train.epochs takes an integer (default 250)``."""
  text = one_line(error)
  found = re.match(r'flag --([^=\s]+)=(.*?): (.*)$', text, re.S)
  if not found:
    return text
  name, value, reason = found.groups()
  if name in _CONFIG_FLAGS:   # the config file raised (an unknown variant, a bad field)
    return f'--{name}={value}: {describe_config_error(error)}'
  flag = flag_values[name] if name in flag_values else None
  if flag is None:
    return f'--{name}={value}: {reason}'
  kind = flag.parser.flag_type()
  wanted = _TYPE_WORDS.get(kind, kind)
  choices = getattr(flag.parser, 'enum_values', None)
  if choices:
    wanted = 'one of ' + ', '.join(str(c) for c in choices)
  head, dot, field = name.partition('.')
  if dot and head in _CONFIG_FLAGS:
    return f'--{name}={value}: {field} takes {wanted} (default {flag.default!r})'
  return f'--{name}={value}: expected {wanted} (--help lists the flags)'


def unknown_field_message(error, argv):
  """``unknown config field train.epoch; did you mean train.epochs?`` for an override whose
  path does not exist (ml_collections names only the last unknown key)."""
  root = error
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  if not isinstance(root, KeyError) or not root.args:
    return None
  key = str(root.args[0])
  suggestion = re.search(r'Did you mean "([^"]+)"', str(error))
  for arg in argv:
    match = re.match(r'--?(\w+)\.([\w.]+)(=.*)?$', arg)
    if not match:
      continue
    parts = match.group(2).split('.')
    if key not in parts:
      continue
    head = parts[:parts.index(key)]
    message = f'unknown config field {".".join(head + [key])} (--{match.group(1)}.' \
              f'{match.group(2)})'
    if suggestion:
      message += f'; did you mean {".".join(head + [suggestion.group(1)])}?'
    return message
  return None


def describe_config_error(error):
  """ml_collections' message of a config problem, without its nested reprs and tracebacks: a
  file that cannot be read, an error raised by the config file (an unknown variant), or an
  override naming an unknown field (with its "did you mean" hint)."""
  root = error
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  if isinstance(root, OSError) and root.filename:
    return f'cannot load {root.filename}: {root.strerror}; {configs.CONFIG_HELP}'
  text = one_line(error).replace("''", "'")
  missing = re.search(r"\[Errno \d+\] ([^:]+): '([^']+)", text)
  if missing:
    return f'cannot load {missing.group(2)}: {missing.group(1)}; {configs.CONFIG_HELP}'
  if 'Traceback (most recent call last)' in text:
    # The config file raised: keep its own message (the text after the last "Error: ").
    text = re.split(r'\b\w*(?:Error|Exception): ', text)[-1]
  text = text.strip("'\" ")
  if 'Did you mean' in text:
    field, _, hint = text.partition('Did you mean')
    return f"unknown field {field.strip(chr(39) + ' ')!r}; did you mean{hint.rstrip(chr(39))}"
  return text


HELP_FLAGS = ('--help', '-h', '--helpshort', '-?')


def flags_help(flag_list):
  """absl's help text of ``flag_list`` (name, help, default), without absl's own flags."""
  listing = flags.FlagValues()
  for flag in flag_list:
    listing[flag.name] = flag
  return listing.get_help(include_special_flags=False)


def run(main, define_flags, usage, argv=None):
  """``app.run(main)`` for a command whose flags ``define_flags()`` defines in absl's global
  registry: dashed flag names, ``--help`` printing ``usage`` and those flags then exiting 0,
  and the project's flag-error handling."""
  before = {id(flags.FLAGS[name]) for name in flags.FLAGS}
  define_flags()
  own = {flags.FLAGS[name].name: flags.FLAGS[name] for name in flags.FLAGS
         if id(flags.FLAGS[name]) not in before}
  argv = underscore_flags(sys.argv if argv is None else argv)
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(usage.strip().replace('``', '') + '\n\nflags:\n'
          + flags_help(own[name] for name in sorted(own)))
    sys.exit(0)
  app.run(main, argv=argv, flags_parser=parse_flags)


class FolderGuard:
  """Removes ``path`` on an input error when this command created it and left nothing of
  value (no checkpoint): a failed command leaves no empty or half-made workdir."""

  def __init__(self, path, keep=('checkpoints',)):
    self.path = path
    self.existed = path is not None and os.path.exists(path)
    self.keep = keep

  def cleanup(self):
    if self.path is None or self.existed or not os.path.isdir(self.path):
      return
    for name in self.keep:
      folder = os.path.join(self.path, name)
      if os.path.isdir(folder) and any(not n.startswith('.') for n in os.listdir(folder)):
        return
    shutil.rmtree(self.path, ignore_errors=True)


class Command:
  """The flags of one command (absl, in a ``FlagValues`` of its own so that commands never
  collide), parsed with the project's rules: dashes or underscores in flag names, ``--help``
  printing the usage and every flag then exiting 0, a bad flag one line and exit 2. Define
  flags with ``flag_values=command.flags``."""

  def __init__(self, prog, usage):
    self.prog, self.usage = prog, usage
    self.flags = flags.FlagValues()

  def help_text(self):
    return (self.usage.strip().replace('``', '') + '\n\nflags:\n'
            + self.flags.get_help(include_special_flags=False))

  def parse(self, argv=None):
    """Parses ``argv`` (without the program name; default ``sys.argv[1:]``) from the defaults
    up; returns the positional arguments."""
    argv = underscore_flags(list(sys.argv[1:] if argv is None else argv))
    if any(arg in HELP_FLAGS for arg in argv):
      print(self.help_text())
      sys.exit(0)
    self.flags.unparse_flags()
    try:
      return self.flags([self.prog] + argv)[1:]
    except flags.Error as e:
      message = describe_flag_error(e, argv, self.flags)
      fail(message if '--help' in message else f'{message} (--help lists the flags)')

  def parse_flags_only(self, argv=None):
    """``parse`` for a command without positional arguments; returns the flag values."""
    rest = self.parse(argv)
    if rest:
      fail(f'unexpected arguments: {" ".join(rest)}')
    return self.flags
