"""The error of prediction: a problem with the inputs, the outputs or the checkpoint, with a
message meant for the user (one line, exit status 2)."""


class PredictionError(ValueError):
  """A problem with the inputs or the checkpoint, with a message meant for the user."""
