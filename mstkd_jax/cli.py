"""What every command line of the project shares: flag spelling, one-line errors, exit codes.

Exit status: 0 done; 2 a usage or input error (a bad flag, config field, file, data folder),
reported as one line ``error: ...`` on stderr with no traceback (``MSTKD_TRACEBACK=1`` shows
it); other statuses are the command's own (main.py: 3 non-finite loss, 128 + signal).
"""

import os
import re
import shutil
import sys

from absl import app, flags

USAGE_ERROR = 2


class InputError(Exception):
  """A problem with what the user gave (a file, a folder, a value): one line, exit 2."""


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
    fail(describe_config_error(e))


def config_flag(name='config'):
  """The value of a ``config_flags`` flag. ml_collections loads the file and applies the
  ``--config.*`` overrides on first access; their problems become one line and exit 2."""
  try:
    value = getattr(flags.FLAGS, name)
    # A file that failed to load comes back as a stand-in that raises on first use.
    value.keys()
    return value
  except Exception as e:  # pylint: disable=broad-except
    if show_tracebacks():
      raise
    fail(f'--{name}: {describe_config_error(e)}')


def describe_config_error(error):
  """ml_collections' message of a config problem, without its nested reprs and tracebacks: a
  file that cannot be read, an error raised by the config file (an unknown variant), or an
  override naming an unknown field (with its "did you mean" hint)."""
  root = error
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  if isinstance(root, OSError) and root.filename:
    return f'cannot load {root.filename}: {root.strerror}'
  text = one_line(error).replace("''", "'")
  missing = re.search(r"\[Errno \d+\] ([^:]+): '([^']+)", text)
  if missing:
    return f'cannot load {missing.group(2)}: {missing.group(1)}'
  if 'Traceback (most recent call last)' in text:
    # The config file raised: keep its own message (the text after the last "Error: ").
    text = re.split(r'\b\w*(?:Error|Exception): ', text)[-1]
  text = text.strip("'\" ")
  if 'Did you mean' in text:
    field, _, hint = text.partition('Did you mean')
    return f"unknown field {field.strip(chr(39) + ' ')!r}; did you mean{hint.rstrip(chr(39))}"
  return text


HELP_FLAGS = ('--help', '-h', '--helpshort', '-?')


def print_help():
  """The command's usage (its ``__main__`` docstring) and its own flags, then exit 0."""
  usage = (sys.modules['__main__'].__doc__ or '').strip().replace('``', '')
  print(usage + '\n\nflags:\n' + flags.FLAGS.main_module_help())
  sys.exit(0)


def run(main, argv=None):
  """``app.run(main)`` with dashed flag names, ``--help`` exiting 0, and the project's
  flag-error handling."""
  argv = underscore_flags(sys.argv if argv is None else argv)
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print_help()
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
      fail(f'{one_line(e)} (--help lists the flags)')

  def parse_flags_only(self, argv=None):
    """``parse`` for a command without positional arguments; returns the flag values."""
    rest = self.parse(argv)
    if rest:
      fail(f'unexpected arguments: {" ".join(rest)}')
    return self.flags
