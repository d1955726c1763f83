"""User-facing errors. No IPython here: magics.py turns these into UsageError."""


class TorchMagicError(Exception):
    """A mistake the user can fix. The message is one line that says what to do."""
