"""The small input syntax of the magics: shapes and argument lines. Pure."""
from __future__ import annotations

import ast
import re
import unicodedata

from .errors import TorchMagicError

# A generated input larger than this many elements is refused before anything is allocated.
MAX_INPUT_ELEMENTS = 2**31
# The choices of options, here so that the magics' parsers are built without importing the core.
SHAPE_MODES = ("auto", "real", "fake", "meta")  # %shapes --mode
AMP_DTYPES = ("bf16", "fp16")  # %memory plan --amp
SHARDS = ("ddp", "fsdp", "zero2")  # %memory plan --shard

_SHAPE_CHARS = re.compile(r"^[\s\d,()\[\]x.eE+\-_]+$")
_OPEN = "([{"
_CLOSE = ")]}"

def split_line(line: str) -> list[str]:
    """Split on whitespace outside brackets and quotes, so `torch.randn(1, 3)` stays one token."""
    tokens, current, depth, quote = [], [], 0, ""
    for ch in line:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch in _OPEN:
            depth += 1
            current.append(ch)
        elif ch in _CLOSE:
            depth -= 1
            current.append(ch)
        elif ch.isspace() and depth <= 0:
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if quote or depth > 0:
        raise TorchMagicError(f"unbalanced brackets or quotes in {line.strip()!r}: close every ( [ {{ and quote")
    if current:
        tokens.append("".join(current))
    return tokens


def _ascii_shape(text: str) -> str:
    """Full-width digits and commas (what a Japanese or Chinese input method types) as ASCII."""
    return unicodedata.normalize("NFKC", text).strip()


def looks_like_shape(text: str) -> bool:
    """True for text meant as a shape (digits and commas), even a malformed one; an expression that
    names anything, such as (x1,) or (x, 2), is not a shape."""
    text = _ascii_shape(text)
    return (bool(text) and bool(_SHAPE_CHARS.match(text)) and any(c.isdigit() for c in text)
            and not text.isidentifier() and not _names_something(text))


def _names_something(text: str) -> bool:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:  # "1x3", "1,,3": a malformed shape
        return False
    return any(isinstance(node, ast.Name) for node in ast.walk(tree))


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,1,32,32', '(1,1,32,32)' or '[1, 3]' -> (1, 1, 32, 32). Anything else: TorchMagicError."""
    body = _ascii_shape(text)
    if len(body) >= 2 and body[0] + body[-1] in ("()", "[]"):
        body = body[1:-1]
    parts = [p.strip() for p in body.split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:  # "(3,)" is a 1-d shape
        parts.pop()
    example = "write sizes as whole numbers separated by commas, e.g. 1,3,32,32"
    if not parts or any(p == "" for p in parts):
        raise TorchMagicError(f"{text.strip()!r} has an empty size: {example}")
    dims = []
    for p in parts:
        if not re.fullmatch(r"[+-]?\d+", p):
            raise TorchMagicError(f"{p!r} in {text.strip()!r} is not a whole number: {example}")
        if len(p.lstrip("+-0")) > 30:  # int() refuses very long digit strings; no tensor is that large
            raise TorchMagicError(f"a size of {len(p.lstrip('+-0'))} digits in {text.strip()!r} is too large "
                                  f"to allocate; use a smaller shape")
        value = int(p)
        if value <= 0:
            raise TorchMagicError(f"{p!r} in {text.strip()!r} is not a positive size: {example}")
        dims.append(value)
    numel = 1
    for d in dims:
        numel *= d
    if numel > MAX_INPUT_ELEMENTS:
        raise TorchMagicError(
            f"shape {text.strip()} has {numel:,} elements, too many to allocate; use a smaller shape"
        )
    return tuple(dims)


def format_shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
