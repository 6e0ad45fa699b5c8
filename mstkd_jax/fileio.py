"""Files written whole or not at all: a crash never leaves a half-written JSON or text file."""

import json
import os
import uuid


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
