"""Run keys and checkpoint ids: the one place that knows their shapes.

A run key is a hash of the run id, so any run id (``../x``, NUL, 1 KB of unicode) maps to a
short, fixed-length string of ``[a-z2-7]`` that is safe as a file name, a Redis hash tag, an S3
key segment or a DynamoDB key. A checkpoint id encodes where its record lives
(``ck-<run key>-<incarnation>-<sequence>``), so ``restore_from`` is one direct read; the
incarnation is random per creation of the run, so an id of a deleted run never resolves to a
checkpoint of a later run with the same id.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import numbers
import operator
import os
import re

from fastcheckpoint.errors import ValidationError

MAX_RUN_ID_BYTES = 4096

_RUN_KEY_BYTES = 15  # 120 bits: 24 base32 characters, no padding
_INCARNATION_BYTES = 5  # 40 bits: 8 base32 characters
_CHECKPOINT_ID = re.compile(r"ck-([a-z2-7]{24})-([a-z2-7]{8})-(0|[1-9][0-9]{0,18})")
MAX_SEQUENCE = 2**63 - 2
"""The largest sequence an id can name: every store keeps sequences, and the one after them,
in 64-bit integers. An id naming a larger one was never made: it names no checkpoint."""


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if acceptable, else raise :class:`ValidationError` saying why."""
    if not isinstance(run_id, str):
        raise ValidationError(f"run_id must be a str, got {type(run_id).__name__}")
    if not run_id:
        raise ValidationError("run_id must not be empty")
    try:
        size = len(run_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError("run_id must be valid unicode (it has a lone surrogate)") from exc
    if size > MAX_RUN_ID_BYTES:
        raise ValidationError(f"run_id is {size} bytes of UTF-8; the limit is {MAX_RUN_ID_BYTES}")
    return run_id


def derived_run_id(run_id: str, suffix: str) -> str:
    """``run_id + suffix``, with ``run_id`` cut (at a character) so that the result is a valid
    run id: a run id at the size limit still gets one."""
    room = MAX_RUN_ID_BYTES - len(suffix.encode("utf-8"))
    base = run_id.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    return base + suffix


def run_key(run_id: str) -> str:
    """The store address of a run: 24 characters of ``[a-z2-7]``."""
    digest = hashlib.blake2b(run_id.encode("utf-8"), digest_size=_RUN_KEY_BYTES).digest()
    return _b32(digest)


def foreign_run(key: str, run_id: str) -> str | None:
    """Why a run record naming ``run_id`` does not belong at run key ``key``, or ``None``.

    Every store's rule for a record it reads at a run's key: the run id it names maps to that
    key. One copied over from another run names that run, and used as this one's it would
    hand out this key's checkpoint ids in the other run's incarnation and list the other run
    twice: it is damage (writers refuse it, listings skip it, repair rebuilds it). The phrase
    follows the store's name for the record ("the run row names another run ...")."""
    try:
        if _cached_run_key(plain_str(run_id)) == key:
            return None
    except UnicodeEncodeError:
        return "names a run id that is not UTF-8 text"
    return f"names another run ({run_id[:80]!r}), copied over from it"


_cached_run_key = functools.lru_cache(maxsize=4096)(run_key)
""":func:`run_key` for the check of every append and of every run record read: the same few
runs on every step (a digest and its encoding take about 6 µs)."""


def key_of(run_id: object) -> str:
    """Validate ``run_id`` and return its run key (:class:`ValidationError` if unacceptable).

    Cached: an agent names the same few runs on every step. Only valid ids are cached
    (``lru_cache`` does not keep calls that raise), and only a plain ``str`` reaches the cache
    (the text of a ``str`` subclass, whose ``__hash__`` or ``__eq__`` may do anything).
    """
    if not isinstance(run_id, str):
        raise ValidationError(f"run_id must be a str, got {type(run_id).__name__}")
    return _valid_key(plain_str(run_id))


def plain_str(value: str) -> str:
    """The text of ``value`` as a plain ``str``: a subclass's own ``__eq__``, ``__hash__``,
    ``__len__`` or ``__str__`` (which may raise) never runs in the library."""
    return value if type(value) is str else str.__str__(value)


def plain_int(value: object) -> int | None:
    """``value`` as a plain ``int`` when it is an integer (an ``int`` or a subclass such as
    ``IntEnum``, a numpy integer: a :class:`numbers.Integral` that is no ``bool``), else
    ``None``. Only ``int``'s own conversion runs on an ``int`` subclass."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int.__int__(value)
    if not isinstance(value, numbers.Integral):
        return None
    try:
        return operator.index(value)
    except Exception:  # an __index__ that fails: no integer, refused by the caller
        return None


def plain_float(value: object) -> float | None:
    """``value`` as a plain ``float`` when it is a real number (an ``int``, a ``float``, a
    numpy number: a :class:`numbers.Real` that is no ``bool``), else ``None``; an infinity
    for an integer too large for a float."""
    if isinstance(value, float):
        return float.__float__(value)
    whole = plain_int(value)
    if whole is None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return None
    try:
        return float(value) if whole is None else float(whole)  # type: ignore[arg-type]
    except OverflowError:  # an integer too large for a float
        return math.inf if whole is None or whole > 0 else -math.inf
    except Exception:  # a __float__ that fails: no number, refused by the caller
        return None


@functools.lru_cache(maxsize=4096)
def _valid_key(run_id: str) -> str:
    validate_run_id(run_id)
    return run_key(run_id)


def new_incarnation() -> str:
    return _b32(os.urandom(_INCARNATION_BYTES))


def checkpoint_id(key: str, incarnation: str, sequence: int) -> str:
    return f"ck-{key}-{incarnation}-{sequence}"


def parse_checkpoint_id(value: object) -> tuple[str, str, int] | None:
    """``(run_key, incarnation, sequence)`` of a well-formed id, else ``None``."""
    if not isinstance(value, str):
        return None
    match = _CHECKPOINT_ID.fullmatch(value)
    if match is None or int(match[3]) > MAX_SEQUENCE:
        return None
    return match[1], match[2], int(match[3])


def require_checkpoint_id(value: object, what: str = "checkpoint_id") -> tuple[str, str, int]:
    """Like :func:`parse_checkpoint_id` but raises :class:`ValidationError` on a bad id."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str, got {type(value).__name__}")
    parsed = parse_checkpoint_id(value)
    if parsed is None:
        raise ValidationError(
            f"{what} {value[:80]!r} is not a fastcheckpoint id "
            "(expected 'ck-<run key>-<incarnation>-<sequence>' as returned by create)"
        )
    return parsed
