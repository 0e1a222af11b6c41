"""Store URLs: which one the environment selects, and how to show one without its password."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from urllib.parse import quote, urlencode, urlsplit

from fastcheckpoint._config import check_default_ttl, check_setting_text
from fastcheckpoint.errors import ConfigurationError

__all__ = ["redacted", "store_url_from_env", "ttl_seconds_from_days", "without_password"]


def store_url_from_env(env: Mapping[str, str]) -> str:
    """``FASTCHECKPOINT_URL``, else the store ``CHECKPOINT_MODE`` implies.

    ``development`` is the memory store; ``production`` is DynamoDB with payloads in S3, named
    by ``CHECKPOINT_TABLE_NAME`` and ``CHECKPOINT_S3_BUCKET`` (the region comes from
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` through botocore).
    """
    url = env.get("FASTCHECKPOINT_URL")
    if url:
        return url
    mode = env.get("CHECKPOINT_MODE", "").strip().lower()
    if mode == "development":
        return "memory://"
    if mode == "production":
        table = env.get("CHECKPOINT_TABLE_NAME", "").strip()
        bucket = env.get("CHECKPOINT_S3_BUCKET", "").strip()
        if not table or not bucket:
            raise ConfigurationError(
                "CHECKPOINT_MODE=production needs CHECKPOINT_TABLE_NAME and CHECKPOINT_S3_BUCKET "
                "(create both with: fastcheckpoint init 'dynamodb://TABLE?bucket=BUCKET')"
            )
        check_setting_text("CHECKPOINT_TABLE_NAME", table)
        check_setting_text("CHECKPOINT_S3_BUCKET", bucket)
        return f"dynamodb://{quote(table, safe='')}?{urlencode({'bucket': bucket})}"
    if mode:
        raise ConfigurationError(
            f"CHECKPOINT_MODE={mode!r} is not valid; use development or production")
    raise ConfigurationError(
        "FASTCHECKPOINT_URL is not set (e.g. memory://, file:///var/lib/ckpt)")


def ttl_seconds_from_days(raw: str) -> float:
    """``CHECKPOINT_TTL_DAYS`` in seconds: a finite number of days above zero."""
    try:
        days = float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"CHECKPOINT_TTL_DAYS={raw!r} is not a number") from exc
    if not math.isfinite(days) or days <= 0:
        raise ConfigurationError(f"CHECKPOINT_TTL_DAYS must be > 0, got {raw!r}")
    check_default_ttl(days * 86400.0, f"CHECKPOINT_TTL_DAYS={raw!r} in seconds")
    return days * 86400.0


_USERINFO = re.compile(r"://([^:/@]*):([^@/]*)@")


def without_password(text: str, url: str) -> str:
    """``text`` with the URL's password, if any, replaced by ``***`` (error messages of
    drivers may quote it anywhere). In a URL too malformed to take apart, whatever stands
    between ``user:`` and ``@`` is taken for the password."""
    try:
        password = urlsplit(url).password if "://" in url else None
    except ValueError:
        found = _USERINFO.search(url)
        password = found.group(2) if found else None
    return text.replace(password, "***") if password else text


def redacted(url: str) -> str:
    """The URL with its password, if any, replaced by ``***``, for messages and output."""
    return without_password(url, url)
