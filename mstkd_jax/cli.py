"""Small command-line helpers shared by the project's entry points."""


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
