"""Where the Google ADK session service keeps things: run ids and labels.

A session is the run ``google-adk:<app>/<user>/<session>``, each part percent-encoded (so
``/`` and ``:`` inside a name cannot shift the parts, and the run id decodes back to the
three names). It carries two labels, ``google-adk:app:<app>`` and
``google-adk:user:<app>/<user>``, which ``list_sessions`` pages through; a label that would
pass the store's limit holds a SHA-256 of the encoded names instead (``sha256:`` never
appears in an encoded name, whose ``:`` is ``%3A``). App state and user state are the runs
``google-adk-app:<app>`` and ``google-adk-user:<app>/<user>``, without labels, so listings
never see them. No ADK import here.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple
from urllib.parse import quote, unquote

from fastcheckpoint.errors import ValidationError
from fastcheckpoint.stores import MAX_LABEL_BYTES

SESSION_PREFIX = "google-adk:"
APP_STATE_PREFIX = "google-adk-app:"
USER_STATE_PREFIX = "google-adk-user:"
_APP_LABEL = "google-adk:app:"
_USER_LABEL = "google-adk:user:"


class SessionName(NamedTuple):
    app_name: str
    user_id: str
    session_id: str


def _part(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str, got {type(value).__name__}")
    try:
        return quote(value, safe="")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{what} is not valid unicode (it has a lone surrogate)") from exc


def session_run_id(app_name: str, user_id: str, session_id: str) -> str:
    return (f"{SESSION_PREFIX}{_part('app_name', app_name)}/{_part('user_id', user_id)}/"
            f"{_part('session_id', session_id)}")


def parse_session_run_id(run_id: str) -> SessionName | None:
    """The names a session's run id encodes; ``None`` for any other run id."""
    if not run_id.startswith(SESSION_PREFIX):
        return None
    parts = run_id[len(SESSION_PREFIX):].split("/")
    if len(parts) != 3:
        return None
    try:
        return SessionName(*(unquote(part, errors="strict") for part in parts))
    except UnicodeDecodeError:
        return None


def app_state_run_id(app_name: str) -> str:
    return f"{APP_STATE_PREFIX}{_part('app_name', app_name)}"


def user_state_run_id(app_name: str, user_id: str) -> str:
    return f"{USER_STATE_PREFIX}{_part('app_name', app_name)}/{_part('user_id', user_id)}"


def app_label(app_name: str) -> str:
    return _label(_APP_LABEL, _part("app_name", app_name))


def user_label(app_name: str, user_id: str) -> str:
    return _label(_USER_LABEL, f"{_part('app_name', app_name)}/{_part('user_id', user_id)}")


def _label(prefix: str, encoded: str) -> str:
    label = prefix + encoded  # ASCII: one byte a character
    if len(label) <= MAX_LABEL_BYTES:
        return label
    return f"{prefix}sha256:{hashlib.sha256(encoded.encode('ascii')).hexdigest()}"
