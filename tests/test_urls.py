"""Store URLs: the environment's choice, and passwords kept out of what is printed."""

from __future__ import annotations

import pytest

from fastcheckpoint._urls import redacted, store_url_from_env, without_password
from fastcheckpoint.errors import ConfigurationError


def test_printed_urls_hide_passwords() -> None:
    assert redacted("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redacted("rediss://app:s3cret@cache/0?prefix=a") == "rediss://app:***@cache/0?prefix=a"
    assert redacted("postgresql://app:pw@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redacted("file:///var/lib/ckpt") == "file:///var/lib/ckpt"


def test_a_password_quoted_in_an_error_is_hidden_too() -> None:
    url = "redis://app:hunter2@cache:6379/0"
    shown = without_password("auth failed for hunter2 at cache", url)
    assert shown == "auth failed for *** at cache"


def test_a_malformed_url_is_shown_as_it_is_but_for_its_password() -> None:
    assert redacted("redis://[::1:6379") == "redis://[::1:6379"
    assert redacted("not a url") == "not a url"
    assert redacted("postgresql://app:pw@[::1:5432/x") == "postgresql://app:***@[::1:5432/x"


def test_the_url_wins_over_the_mode() -> None:
    env = {"FASTCHECKPOINT_URL": "file:///x", "CHECKPOINT_MODE": "production"}
    assert store_url_from_env(env) == "file:///x"


def test_production_mode_names_table_and_bucket_quoted() -> None:
    env = {"CHECKPOINT_MODE": " Production ", "CHECKPOINT_TABLE_NAME": "a/b",
           "CHECKPOINT_S3_BUCKET": "blobs"}
    assert store_url_from_env(env) == "dynamodb://a%2Fb?bucket=blobs"


@pytest.mark.parametrize("env", [{}, {"CHECKPOINT_MODE": "staging"},
                                 {"CHECKPOINT_MODE": "production", "CHECKPOINT_TABLE_NAME": "t"}])
def test_no_store_chosen_is_a_configuration_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        store_url_from_env(env)
