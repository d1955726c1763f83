"""User-facing errors. No IPython here: magics.py turns these into UsageError."""


class TorchMagicError(Exception):
    """A mistake the user can fix. The message is one line that says what to do."""


def one_line(message: str, longest: int = 80) -> str:
    """A message fit for one line: lines joined, and any very long word (a pasted name or shape)
    elided in the middle, so that the advice at the end stays in view."""
    words = " / ".join(line.strip() for line in message.splitlines() if line.strip()).split(" ")
    return " ".join(w if len(w) <= longest else f"{w[:longest // 2]}…{w[-12:]} ({len(w):,} characters)"
                    for w in words)
