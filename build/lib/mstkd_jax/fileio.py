"""Files written whole or not at all: a crash never leaves a half-written JSON or text file."""

import json
import os
import uuid


def write_text_atomic(path, text):
  """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}')
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path, obj, indent=1):
  write_text_atomic(path, json.dumps(obj, indent=indent))
