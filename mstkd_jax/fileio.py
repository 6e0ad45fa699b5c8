"""Files written whole or not at all: a crash never leaves a half-written JSON or text file.
JSON files read with one clear error when they are not JSON."""

import json
import os
import uuid

from mstkd_jax.cli import InputError


class BadJsonFile(InputError, ValueError):
  """A file that should hold JSON does not (the message names the file and the position)."""


def write_bytes_atomic(path, data):
  """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path, text):
  """``write_bytes_atomic`` of ``text`` in UTF-8."""
  write_bytes_atomic(path, text.encode('utf-8'))


def write_json_atomic(path, obj, indent=1):
  write_text_atomic(path, json.dumps(obj, indent=indent))


def read_json(path):
  """The JSON value in ``path``; ``BadJsonFile`` naming the file, the line and the column when
  it is not valid JSON (OSError when it cannot be read)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return json.loads(data.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise BadJsonFile(f'{path} is not valid JSON: not UTF-8 text (byte {e.start}); restore it '
                      'or delete it') from e
  except json.JSONDecodeError as e:
    raise BadJsonFile(f'{path} is not valid JSON: {e.msg} at line {e.lineno}, column '
                      f'{e.colno}; restore it or delete it') from e
