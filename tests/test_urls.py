"""Store URLs: the environment's choice, passwords kept out of what is printed, and what
``open_store`` makes of a string without ``://``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcheckpoint import CheckpointManager, FileStore, open_store
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


# -- what open_store makes of a string without "://" --------------------------------------------


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("sqlite:runs.db", "sqlite:///runs.db"),
        ("sqlite:/var/lib/runs.db", "sqlite:////var/lib/runs.db"),
        ("SQLite:runs.db", "sqlite:///runs.db"),
        ("file:/var/lib/ckpt", "file:///var/lib/ckpt"),
        ("memory:", "memory://"),
        ("redis:localhost:6379/0", "redis://localhost:6379/0"),
        ("s3:/bucket/agents", "s3://bucket/agents"),
    ],
)
def test_a_known_scheme_without_its_slashes_is_refused_with_the_url_meant(
    typed: str, meant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError, match="did you mean") as caught:
        open_store(typed)

    assert f"did you mean {meant!r}?" in str(caught.value)
    assert list(tmp_path.iterdir()) == [], "a mistyped URL made a directory"


def test_a_mistyped_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store("redis:app:hunter2@cache:6379/0")

    assert "did you mean 'redis://app:***@cache:6379/0'?" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_relative_file_url_is_refused_with_its_absolute_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError) as caught:
        open_store("file:checkpoints")

    assert f"did you mean 'file://{tmp_path / 'checkpoints'}'?" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["./sqlite:runs.db", "C:checkpoints", "runs:2026", "plain"])
def test_a_path_with_a_colon_but_no_known_scheme_is_a_file_store(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = open_store(path)

    assert isinstance(store, FileStore)
    assert (tmp_path / path).is_dir()


def test_a_plain_path_from_home_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)

    store = open_store("~/ckpt")

    assert isinstance(store, FileStore)
    assert (home / "ckpt").is_dir()
    assert list(work.iterdir()) == [], "made a directory named '~'"


def test_the_environment_url_expands_home_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    manager = CheckpointManager.from_env({"FASTCHECKPOINT_URL": "~/from-env"})

    assert isinstance(manager.store, FileStore)
    assert (tmp_path / "from-env").is_dir()
    assert not (tmp_path / "~").exists()


def test_a_home_that_cannot_be_expanded_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError, match="no such user"):
        open_store("~no-such-user-h211/ckpt")

    assert list(tmp_path.iterdir()) == []
