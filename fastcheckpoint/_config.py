"""Configuration: the manager's settings, the one retry policy, and the pauses of a step
tried again until a deadline."""

from __future__ import annotations

import difflib
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fastcheckpoint._codec import DecHook, EncHook
from fastcheckpoint._ids import plain_float, plain_int, plain_str
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import ConfigurationError

__all__ = ["CheckpointConfig", "RetryPolicy", "pauses_within"]

ENV_PREFIX = "FASTCHECKPOINT_"
# Read by CheckpointManager.from_env and the benchmark harness rather than by CheckpointConfig.
_ENV_OWNED_ELSEWHERE = ("FASTCHECKPOINT_URL", "FASTCHECKPOINT_BENCH_")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient backend failures.

    Backends hand these numbers to their drivers' own retry machinery where it exists.
    """

    base_delay: float = 0.1
    max_delay: float = 1.6
    max_retries: int = 5

    def __post_init__(self) -> None:
        _plain_numbers(self, {"base_delay": plain_float, "max_retries": plain_int,
                              "max_delay": plain_float})
        _check_number("retry base_delay", self.base_delay, minimum=0.0, strict=True)
        _check_number("retry max_delay", self.max_delay, minimum=0.0, strict=True)
        if self.max_delay < self.base_delay:
            raise ConfigurationError("retry max_delay must be >= base_delay")
        _check_int("retry max_retries", self.max_retries, minimum=0)

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Sleep before retry number ``attempt`` (0-based): uniform in [0, min(cap, base*2^n)]."""
        # 2**64 times any sane base is past any cap; clamping avoids float overflow.
        ceiling: float = min(self.max_delay, self.base_delay * 2.0 ** min(attempt, 64))
        return rng() * ceiling

    def delays(self) -> Iterator[float]:
        return (self.delay(attempt) for attempt in range(self.max_retries))


def pauses_within(patience: float, *, first: float, longest: float) -> Iterator[float]:
    """The pauses between tries of a step refused for a while (another writer busy): doubling
    from ``first`` up to ``longest``, as long as the next one ends within ``patience`` seconds
    of this call. ``next(pauses, None)`` is ``None`` once the step should give up."""
    deadline = time.monotonic() + patience
    return _doubling(deadline, first, longest)


def _doubling(deadline: float, pause: float, longest: float) -> Iterator[float]:
    while time.monotonic() + pause <= deadline:
        yield pause
        pause = min(2 * pause, longest)


@dataclass
class CheckpointConfig:
    """Manager settings. The first five fields match FastAgentic's ``CheckpointConfig``."""

    auto_checkpoint: bool = True
    checkpoint_interval: float = 0.0
    """Minimum seconds between non-forced creates of one run (0 = no throttling)."""
    max_checkpoints_per_run: int | None = 100
    """Keep the newest N live checkpoints per run; ``None`` or 0 keeps all."""
    default_ttl_seconds: float | None = None
    """TTL of checkpoints created without ``ttl_seconds``; ``None`` = never expire."""
    cleanup_interval: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compress_min_bytes: int | None = 256 * 1024
    """Payloads at least this large are zlib-compressed when that makes them smaller."""
    offload_min_bytes: int = 512 * 1024
    """Payloads at least this large are encoded and decoded in a worker thread."""
    cleanup_batch_size: int = 500
    max_sequence_retries: int = 32
    """How often a create re-reads and retries after losing a sequence race."""
    history_min_entries: int | None = 32
    """``messages`` and ``tool_calls`` lists with at least this many entries are stored as a
    log of what each checkpoint adds, not as a copy per checkpoint, on stores that keep nested
    items (all bundled ones); ``None`` stores every checkpoint's lists whole."""
    enc_hook: EncHook | None = None
    dec_hook: DecHook | None = None
    clock: Callable[[], float] = time.time
    """Epoch seconds; the one clock for created_at, expiry and throttling. Inject for tests."""

    def __post_init__(self) -> None:
        if not isinstance(self.auto_checkpoint, bool):
            raise ConfigurationError(
                f"auto_checkpoint must be True or False, got {shown(self.auto_checkpoint)}")
        for name in ("clock", "enc_hook", "dec_hook"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ConfigurationError(f"{name} must be callable, got {shown(value)}")
        _plain_numbers(self, _PLAIN_NUMBERS)
        _check_number("checkpoint_interval", self.checkpoint_interval, minimum=0.0)
        _check_number("cleanup_interval", self.cleanup_interval, minimum=0.0, strict=True)
        if self.max_checkpoints_per_run is not None:
            _check_int("max_checkpoints_per_run", self.max_checkpoints_per_run, minimum=0)
        check_default_ttl(self.default_ttl_seconds)
        if self.compress_min_bytes is not None:
            _check_int("compress_min_bytes", self.compress_min_bytes, minimum=0)
        _check_int("offload_min_bytes", self.offload_min_bytes, minimum=0)
        if self.history_min_entries is not None:
            _check_int("history_min_entries", self.history_min_entries, minimum=1)
        _check_int("cleanup_batch_size", self.cleanup_batch_size, minimum=1)
        _check_int("max_sequence_retries", self.max_sequence_retries, minimum=1)
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError("retry must be a RetryPolicy")

    @property
    def keep_latest(self) -> int | None:
        """The pruning limit as stores take it, a plain ``int`` (also for an ``IntEnum`` or a
        numpy integer assigned after construction): ``None`` keeps all (also for a limit <= 0
        assigned after construction, which FastAgentic treated as unlimited)."""
        limit = plain_int(self.max_checkpoints_per_run)
        return limit if limit is not None and limit > 0 else None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> CheckpointConfig:
        """Read ``FASTCHECKPOINT_<FIELD>`` variables (e.g. ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS``).

        ``FASTCHECKPOINT_RETRY_BASE_DELAY``, ``_RETRY_MAX_DELAY`` and ``_RETRY_MAX_RETRIES`` set
        the retry policy; ``none`` clears an optional number. Unknown ``FASTCHECKPOINT_*``
        variables and malformed values raise :class:`ConfigurationError`.
        """
        env = environment(environ)
        simple = {f.name: f for f in fields(cls) if f.name in _ENV_FIELDS}
        values: dict[str, Any] = {}
        retry: dict[str, Any] = {}
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX) or name.startswith(_ENV_OWNED_ELSEWHERE):
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if key in simple:
                values[key] = _parse(name, raw, _ENV_FIELDS[key])
            elif key.startswith("retry_") and key[6:] in _RETRY_FIELDS:
                retry[key[6:]] = _parse(name, raw, _RETRY_FIELDS[key[6:]])
            else:
                known = sorted(ENV_PREFIX + n.upper() for n in (*simple, *_retry_env_names()))
                raise ConfigurationError(_unknown_setting(name, known))
        if retry:
            values["retry"] = RetryPolicy(**retry)
        values.update(overrides)
        return cls(**values)


def environment(environ: object) -> Mapping[str, str]:
    """``environ`` (``os.environ`` when ``None``), checked to be a mapping of ``str`` names to
    ``str`` values as an environment is (:class:`ConfigurationError` otherwise), copied with
    plain ``str`` names and values (a subclass's own methods never run in the library)."""
    if environ is None:
        return os.environ
    if not isinstance(environ, Mapping):
        raise ConfigurationError(
            f"environ must be a mapping of variable names to values, got {shown(environ)}")
    copied: dict[str, str] = {}
    for name, value in environ.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigurationError(
                f"environ must map str names to str values, got {shown(name)}: {shown(value)}")
        copied[plain_str(name)] = plain_str(value)
    return copied


def _unknown_setting(name: str, known: list[str]) -> str:
    # Compared without the shared prefix, which would make every name look close.
    suffixes = {setting[len(ENV_PREFIX):]: setting for setting in known}
    close = difflib.get_close_matches(name[len(ENV_PREFIX):], list(suffixes), n=1, cutoff=0.6)
    hint = f"; did you mean {suffixes[close[0]]}?" if close else "."
    return f"unknown setting {name}{hint} Known: {', '.join(known)}, {ENV_PREFIX}URL."


def _retry_env_names() -> list[str]:
    return [f"retry_{name}" for name in _RETRY_FIELDS]


# field name -> kind: "bool", "float", "int", "float?" / "int?" (accepts "none")
_ENV_FIELDS = {
    "auto_checkpoint": "bool",
    "checkpoint_interval": "float",
    "max_checkpoints_per_run": "int?",
    "default_ttl_seconds": "float?",
    "cleanup_interval": "float",
    "compress_min_bytes": "int?",
    "offload_min_bytes": "int",
    "cleanup_batch_size": "int",
    "max_sequence_retries": "int",
    "history_min_entries": "int?",
}
_RETRY_FIELDS = {"base_delay": "float", "max_delay": "float", "max_retries": "int"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


_PLAIN_NUMBERS: dict[str, Callable[[object], int | float | None]] = {
    "checkpoint_interval": plain_float,
    "max_checkpoints_per_run": plain_int,
    "default_ttl_seconds": plain_float,
    "cleanup_interval": plain_float,
    "compress_min_bytes": plain_int,
    "offload_min_bytes": plain_int,
    "cleanup_batch_size": plain_int,
    "max_sequence_retries": plain_int,
    "history_min_entries": plain_int,
}


def _plain_numbers(
    settings: object, kinds: Mapping[str, Callable[[object], int | float | None]]
) -> None:
    """Numbers of another type that mean the same (an ``IntEnum``, a numpy number read from a
    settings file) set as plain ``int`` or ``float``: the stores are handed plain numbers.
    Anything else is left for the checks to refuse."""
    for name, plain in kinds.items():
        value = getattr(settings, name)
        if value is None or type(value) in (int, float):
            continue
        number = plain(value)
        if number is not None:
            object.__setattr__(settings, name, number)  # RetryPolicy is frozen


def _parse(name: str, raw: str, kind: str) -> Any:
    text = raw.strip().lower()
    if kind.endswith("?"):
        if text in {"none", "null", ""}:
            return None
        kind = kind[:-1]
    try:
        if kind == "bool":
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(text)
        return float(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not a valid {kind}") from exc


MAX_TTL_SECONDS = 1e13
"""The longest TTL (about 317,000 years): every store can keep an expiry that far ahead (Redis
counts it in milliseconds, and its scripts write numbers exactly only below 10^17)."""


def check_default_ttl(value: object, name: str = "default_ttl_seconds") -> None:
    """A default TTL (the config's or a store's): ``None`` or a finite, positive number of
    seconds up to :data:`MAX_TTL_SECONDS`, else :class:`ConfigurationError`."""
    if value is not None:
        _check_number(name, value, minimum=0.0, strict=True)
        if value > MAX_TTL_SECONDS:  # type: ignore[operator]
            raise ConfigurationError(
                f"{name} must be at most {MAX_TTL_SECONDS:.0f} seconds (about 317,000 years; "
                f"None never expires), got {shown(value)}")


def check_ttl_resolution(name: str, ttl: float, now: float) -> None:
    """:class:`ConfigurationError` when a timestamp near ``now`` cannot hold ``ttl`` (``now +
    ttl == now``): every checkpoint would expire as it is written."""
    if now + ttl <= now:
        raise ConfigurationError(
            f"{name}={ttl!r:.40} is below the clock's resolution: every checkpoint would "
            "expire as it is written")


def ttl_setting(value: object, name: str, now: float) -> float:
    """A TTL setting read where it is used (the config's default, an adapter's
    ``ttl_seconds``): checked as :func:`check_default_ttl` checks it, as a plain ``float`` (a
    numpy number or an ``IntEnum`` for its value), that a timestamp near ``now`` can hold."""
    number = plain_float(value)
    check_default_ttl(value if number is None else number, name)
    ttl = float(value if number is None else number)  # type: ignore[arg-type]
    check_ttl_resolution(name, ttl, now)
    return ttl


def check_setting_text(what: str, text: str) -> None:
    """:class:`ConfigurationError` when ``text`` (a URL, a name, a prefix) is not valid
    unicode: a driver sending it as UTF-8 would fail at its first call."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"{what} {text[:80]!r} is not valid unicode (it has a lone surrogate)") from exc


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite number, also an int too large for a float (not one)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_number(
    name: str, value: object, *, minimum: float, strict: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and _finite(value):  # type: ignore[arg-type]
        below = value <= minimum if strict else value < minimum  # type: ignore[operator]
        if not below:
            return
    relation = ">" if strict else ">="
    raise ConfigurationError(
        f"{name} must be a finite number {relation} {minimum}, got {shown(value)}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return
    raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {shown(value)}")
