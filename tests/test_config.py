"""Configuration: defaults, validation, the retry policy, the environment."""

from __future__ import annotations

import math
import os
import random
import sys
import types
from pathlib import Path
from typing import Any, ClassVar, cast

import anyio
import pytest

from fastcheckpoint import (
    CheckpointConfig,
    CheckpointManager,
    ConfigurationError,
    FileStore,
    MemoryStore,
    RetryPolicy,
    open_store,
)
from fastcheckpoint import _config as config_module
from fastcheckpoint._config import pauses_within
from fastcheckpoint.stores import register_store
from tests._helpers import FakeClock

# -- defaults -----------------------------------------------------------------------------------


def test_defaults_match_the_spec() -> None:
    config = CheckpointConfig()

    assert config.auto_checkpoint is True
    assert config.checkpoint_interval == 0.0
    assert config.max_checkpoints_per_run == 100
    assert config.default_ttl_seconds is None
    assert config.cleanup_interval == 300.0
    assert config.retry == RetryPolicy()
    assert config.keep_latest == 100


def test_retry_defaults_are_100_ms_base_1_6_s_cap_and_5_retries() -> None:
    policy = RetryPolicy()

    assert policy.base_delay == 0.1
    assert policy.max_delay == 1.6
    assert policy.max_retries == 5


@pytest.mark.parametrize("unlimited", [None, 0])
def test_none_or_zero_checkpoints_per_run_means_unlimited(unlimited: int | None) -> None:
    assert CheckpointConfig(max_checkpoints_per_run=unlimited).keep_latest is None


def test_fastagentic_positional_fields_come_first() -> None:
    config = CheckpointConfig(False, 2.0, 10, 60.0, 30.0)

    assert config.auto_checkpoint is False
    assert config.checkpoint_interval == 2.0
    assert config.max_checkpoints_per_run == 10
    assert config.default_ttl_seconds == 60.0
    assert config.cleanup_interval == 30.0


# -- retry policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 1.6), (60, 1.6)],
)
def test_delay_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    policy = RetryPolicy()

    assert policy.delay(attempt, rng=lambda: 1.0) == pytest.approx(ceiling)
    assert policy.delay(attempt, rng=lambda: 0.0) == 0.0
    assert policy.delay(attempt, rng=lambda: 0.25) == pytest.approx(ceiling / 4)


def test_delay_stays_capped_for_huge_attempt_numbers() -> None:
    policy = RetryPolicy()

    assert policy.delay(2000, rng=lambda: 1.0) == pytest.approx(1.6)


def test_delay_is_full_jitter_over_the_whole_range() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0, max_retries=3)
    generator = random.Random(1234)
    samples = [policy.delay(2, rng=generator.random) for _ in range(2000)]

    assert all(0.0 <= sample <= 2.0 for sample in samples)
    assert min(samples) < 0.1
    assert max(samples) > 1.9


def test_pauses_within_double_up_to_the_longest_and_end_within_the_patience(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock(0.0)
    monkeypatch.setattr(config_module.time, "monotonic", clock)
    pauses = []
    for pause in pauses_within(1.0, first=0.1, longest=0.3):
        pauses.append(pause)
        clock.advance(pause + 0.01)  # the try between two pauses takes a while too
    assert pauses == pytest.approx([0.1, 0.2, 0.3, 0.3])  # a fifth (0.3) would end at 1.24
    assert list(pauses_within(0.05, first=0.1, longest=0.3)) == []


def test_delays_yields_one_delay_per_retry_within_bounds() -> None:
    policy = RetryPolicy(base_delay=0.01, max_delay=0.03, max_retries=4)
    delays = list(policy.delays())

    assert len(delays) == 4
    assert all(
        0.0 <= delay <= ceiling
        for delay, ceiling in zip(delays, [0.01, 0.02, 0.03, 0.03], strict=True)
    )


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"base_delay": 0}, id="base-zero"),
        pytest.param({"base_delay": -0.1}, id="base-negative"),
        pytest.param({"base_delay": math.nan}, id="base-nan"),
        pytest.param({"base_delay": math.inf}, id="base-inf"),
        pytest.param({"base_delay": "0.1"}, id="base-str"),
        pytest.param({"max_delay": 0.05}, id="cap-below-base"),
        pytest.param({"max_delay": math.inf}, id="cap-inf"),
        pytest.param({"max_retries": -1}, id="retries-negative"),
        pytest.param({"max_retries": 1.5}, id="retries-float"),
        pytest.param({"max_retries": True}, id="retries-bool"),
    ],
)
def test_invalid_retry_policy_raises_configuration_error(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**settings)


def test_zero_retries_is_allowed() -> None:
    assert list(RetryPolicy(max_retries=0).delays()) == []


# -- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"checkpoint_interval": -1}, id="interval-negative"),
        pytest.param({"checkpoint_interval": math.nan}, id="interval-nan"),
        pytest.param({"checkpoint_interval": "1"}, id="interval-str"),
        pytest.param({"checkpoint_interval": True}, id="interval-bool"),
        pytest.param({"cleanup_interval": 0}, id="cleanup-zero"),
        pytest.param({"cleanup_interval": -5}, id="cleanup-negative"),
        pytest.param({"cleanup_interval": math.inf}, id="cleanup-inf"),
        pytest.param({"max_checkpoints_per_run": -1}, id="limit-negative"),
        pytest.param({"max_checkpoints_per_run": 2.5}, id="limit-float"),
        pytest.param({"max_checkpoints_per_run": True}, id="limit-bool"),
        pytest.param({"max_checkpoints_per_run": "5"}, id="limit-str"),
        pytest.param({"default_ttl_seconds": 0}, id="ttl-zero"),
        pytest.param({"default_ttl_seconds": -1.0}, id="ttl-negative"),
        pytest.param({"default_ttl_seconds": math.nan}, id="ttl-nan"),
        pytest.param({"default_ttl_seconds": math.inf}, id="ttl-inf"),
        pytest.param({"default_ttl_seconds": True}, id="ttl-bool"),
        pytest.param({"default_ttl_seconds": 10**400}, id="ttl-int-beyond-float"),
        pytest.param({"default_ttl_seconds": 1e300}, id="ttl-beyond-a-store"),
        pytest.param({"checkpoint_interval": 10**400}, id="interval-int-beyond-float"),
        pytest.param({"cleanup_interval": -(10**400)}, id="cleanup-int-beyond-float"),
        pytest.param({"compress_min_bytes": -1}, id="compress-negative"),
        pytest.param({"offload_min_bytes": None}, id="offload-none"),
        pytest.param({"offload_min_bytes": -1}, id="offload-negative"),
        pytest.param({"cleanup_batch_size": 0}, id="batch-zero"),
        pytest.param({"max_sequence_retries": 0}, id="sequence-retries-zero"),
        pytest.param({"history_min_entries": 0}, id="history-zero"),
        pytest.param({"history_min_entries": 2.5}, id="history-float"),
        pytest.param({"retry": {"base_delay": 1}}, id="retry-not-a-policy"),
        pytest.param({"auto_checkpoint": "no"}, id="auto-checkpoint-str"),
        pytest.param({"clock": 1_700_000_000.0}, id="clock-not-callable"),
    ],
)
def test_invalid_config_raises_configuration_error(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CheckpointConfig(**settings)


# -- from_env -----------------------------------------------------------------------------------


def test_from_env_parses_every_variable() -> None:
    environ = {
        "FASTCHECKPOINT_AUTO_CHECKPOINT": "false",
        "FASTCHECKPOINT_CHECKPOINT_INTERVAL": "2.5",
        "FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN": "50",
        "FASTCHECKPOINT_DEFAULT_TTL_SECONDS": "7776000",
        "FASTCHECKPOINT_CLEANUP_INTERVAL": "60",
        "FASTCHECKPOINT_COMPRESS_MIN_BYTES": "1024",
        "FASTCHECKPOINT_OFFLOAD_MIN_BYTES": "2048",
        "FASTCHECKPOINT_CLEANUP_BATCH_SIZE": "10",
        "FASTCHECKPOINT_MAX_SEQUENCE_RETRIES": "7",
        "FASTCHECKPOINT_HISTORY_MIN_ENTRIES": "none",
        "FASTCHECKPOINT_RETRY_BASE_DELAY": "0.2",
        "FASTCHECKPOINT_RETRY_MAX_DELAY": "3",
        "FASTCHECKPOINT_RETRY_MAX_RETRIES": "2",
    }

    config = CheckpointConfig.from_env(environ)

    assert config.auto_checkpoint is False
    assert config.checkpoint_interval == 2.5
    assert config.max_checkpoints_per_run == 50
    assert config.default_ttl_seconds == 90 * 86400
    assert config.cleanup_interval == 60.0
    assert config.compress_min_bytes == 1024
    assert config.offload_min_bytes == 2048
    assert config.cleanup_batch_size == 10
    assert config.max_sequence_retries == 7
    assert config.history_min_entries is None
    assert config.retry == RetryPolicy(base_delay=0.2, max_delay=3.0, max_retries=2)


def test_from_env_with_no_variables_gives_the_defaults() -> None:
    config = CheckpointConfig.from_env({"PATH": "/usr/bin", "HOME": "/root"})
    defaults = CheckpointConfig()

    assert (config.max_checkpoints_per_run, config.default_ttl_seconds, config.retry) == (
        defaults.max_checkpoints_per_run,
        defaults.default_ttl_seconds,
        defaults.retry,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        (" on ", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("off", False),
    ],
)
def test_from_env_boolean_spellings(raw: str, expected: bool) -> None:
    config = CheckpointConfig.from_env({"FASTCHECKPOINT_AUTO_CHECKPOINT": raw})

    assert config.auto_checkpoint is expected


@pytest.mark.parametrize(
    "name", ["MAX_CHECKPOINTS_PER_RUN", "DEFAULT_TTL_SECONDS", "COMPRESS_MIN_BYTES"]
)
@pytest.mark.parametrize("raw", ["none", "None", "NONE"])
def test_from_env_none_clears_an_optional_number(name: str, raw: str) -> None:
    config = CheckpointConfig.from_env({f"FASTCHECKPOINT_{name}": raw})

    assert getattr(config, name.lower()) is None


def test_from_env_retry_variables_alone_keep_the_other_retry_defaults() -> None:
    config = CheckpointConfig.from_env({"FASTCHECKPOINT_RETRY_MAX_RETRIES": "9"})

    assert config.retry == RetryPolicy(max_retries=9)


def test_from_env_unknown_variable_raises_configuration_error_naming_it() -> None:
    with pytest.raises(ConfigurationError) as caught:
        CheckpointConfig.from_env({"FASTCHECKPOINT_FOO": "1"})

    assert "FASTCHECKPOINT_FOO" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", "ten"),
        ("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", "1.5"),
        ("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", "-3"),
        ("FASTCHECKPOINT_CHECKPOINT_INTERVAL", "soon"),
        ("FASTCHECKPOINT_CHECKPOINT_INTERVAL", "none"),
        ("FASTCHECKPOINT_AUTO_CHECKPOINT", "maybe"),
        ("FASTCHECKPOINT_AUTO_CHECKPOINT", ""),
        ("FASTCHECKPOINT_DEFAULT_TTL_SECONDS", "0"),
        ("FASTCHECKPOINT_DEFAULT_TTL_SECONDS", "90d"),
        ("FASTCHECKPOINT_CLEANUP_INTERVAL", "nan"),
        ("FASTCHECKPOINT_CLEANUP_INTERVAL", "inf"),
        ("FASTCHECKPOINT_OFFLOAD_MIN_BYTES", "none"),
        ("FASTCHECKPOINT_RETRY_MAX_RETRIES", "x"),
        ("FASTCHECKPOINT_RETRY_BASE_DELAY", "-1"),
        ("FASTCHECKPOINT_RETRY_MAX_DELAY", "0.01"),
    ],
)
def test_from_env_malformed_value_raises_configuration_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigurationError):
        CheckpointConfig.from_env({name: raw})


def test_from_env_ignores_the_store_url_and_other_variables() -> None:
    config = CheckpointConfig.from_env(
        {
            "FASTCHECKPOINT_URL": "memory://",
            "FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN": "3",
            "CHECKPOINT_MODE": "development",
            "PATH": "/bin",
        }
    )

    assert config.max_checkpoints_per_run == 3


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FASTCHECKPOINT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", "12")

    assert CheckpointConfig.from_env().max_checkpoints_per_run == 12


def test_from_env_overrides_win_over_the_environment() -> None:
    clock = FakeClock()
    config = CheckpointConfig.from_env(
        {"FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN": "3"}, max_checkpoints_per_run=4, clock=clock
    )

    assert config.max_checkpoints_per_run == 4
    assert config.clock is clock


# -- CheckpointManager.from_env and open_store --------------------------------------------------


def test_manager_from_env_with_a_memory_url() -> None:
    manager = CheckpointManager.from_env(
        {"FASTCHECKPOINT_URL": "memory://", "FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN": "7"}
    )

    assert isinstance(manager.store, MemoryStore)
    assert manager.config.max_checkpoints_per_run == 7


@pytest.mark.anyio
async def test_manager_from_env_with_a_file_url_stores_in_that_directory(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    environ = {"FASTCHECKPOINT_URL": f"file://{directory}"}
    writer = CheckpointManager.from_env(environ)
    reader = CheckpointManager.from_env(environ)

    with anyio.fail_after(10):
        created = await writer.create("run", {"n": 1})
        restored = await reader.restore("run")
        await writer.aclose()
        await reader.aclose()

    assert isinstance(writer.store, FileStore)
    assert created is not None
    assert restored == created
    assert directory.is_dir()
    assert any(directory.iterdir())


@pytest.mark.parametrize("environ", [{}, {"FASTCHECKPOINT_URL": ""}], ids=["missing", "empty"])
def test_manager_from_env_without_a_url_raises_configuration_error(
    environ: dict[str, str],
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CheckpointManager.from_env(environ)

    assert "FASTCHECKPOINT_URL" in str(caught.value)


def test_manager_from_env_with_a_bad_setting_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        CheckpointManager.from_env({"FASTCHECKPOINT_URL": "memory://", "FASTCHECKPOINT_NOPE": "1"})


def test_manager_from_env_accepts_checkpoint_mode_development() -> None:
    # Teams migrating from the DynamoDB+S3 deployment pattern set CHECKPOINT_MODE instead.
    manager = CheckpointManager.from_env(
        {"CHECKPOINT_MODE": "development", "CHECKPOINT_TTL_DAYS": "90"}
    )

    assert isinstance(manager.store, MemoryStore)
    assert manager.config.default_ttl_seconds == 90 * 86400


@pytest.mark.parametrize("url", ["ftp://host/dir", "nosuch://x", "mem://"])
def test_open_store_unknown_scheme_raises_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store(url)

    assert "memory://" in str(caught.value)  # it lists the schemes it knows


@pytest.mark.parametrize("url", ["", None, 42])
def test_open_store_rejects_a_non_url(url: Any) -> None:
    with pytest.raises(ConfigurationError):
        open_store(url)


def test_open_store_malformed_url_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="malformed store URL"):
        open_store("redis://[::1")


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?prefix=fc\udcc3",
    "redis://us\udcc3:pw@127.0.0.1:6379/0",
    "postgresql://fc@127.0.0.1:5432/d\udcc3",
    "s3://bucket/pr\udcc3fix",
    "dynamodb://Table\udcc3?bucket=b",
])
def test_a_network_store_url_that_is_not_valid_unicode_is_refused(url: str) -> None:
    """Its driver would fail at the first call with UnicodeEncodeError (or worse); a
    ``file://`` path may hold any bytes the system gave and is not checked."""
    with pytest.raises(ConfigurationError, match="not valid unicode"):
        open_store(url)


def test_a_path_store_url_may_hold_what_the_system_gave(tmp_path: Path) -> None:
    """A store whose URL names a path (``file://``, or a third-party one) takes the bytes of
    a name that is not UTF-8 (lone surrogates), as the system gave them."""
    name = str(tmp_path / "caf").encode() + b"\xe9"
    store = open_store("file://" + os.fsdecode(name))
    assert isinstance(store, FileStore)
    with pytest.raises(ConfigurationError, match="CHECKPOINT_TABLE_NAME"):
        CheckpointManager.from_env({"CHECKPOINT_MODE": "production",
                                    "CHECKPOINT_TABLE_NAME": "t\udcc3x",
                                    "CHECKPOINT_S3_BUCKET": "b"})


def test_store_options_beyond_a_float_or_not_unicode_are_configuration_errors() -> None:
    from fastcheckpoint.stores.postgres import PostgresStore
    from fastcheckpoint.stores.redis import RedisStore
    from fastcheckpoint.stores.s3 import S3Store

    with pytest.raises(ConfigurationError, match="default_ttl_seconds"):
        PostgresStore.from_url("postgresql://fc@127.0.0.1:5432/fc",
                               default_ttl_seconds=10**400)
    with pytest.raises(ConfigurationError, match="max_size"):
        PostgresStore.from_url("postgresql://fc@127.0.0.1:5432/fc", max_size=math.inf)
    with pytest.raises(ConfigurationError, match="not valid unicode"):
        RedisStore.from_url("redis://127.0.0.1:6379/0", prefix="fc\udcc3")
    with pytest.raises(ConfigurationError, match="not valid unicode"):
        S3Store("bucket", "pr\udcc3fix")


def test_unknown_setting_suggests_the_nearest_one() -> None:
    with pytest.raises(ConfigurationError, match="did you mean FASTCHECKPOINT_DEFAULT_TTL_SECONDS"):
        CheckpointConfig.from_env({"FASTCHECKPOINT_DEFAULT_TTL_SECOND": "5"})
    with pytest.raises(ConfigurationError) as caught:
        CheckpointConfig.from_env({"FASTCHECKPOINT_ZZZ": "5"})
    assert "did you mean" not in str(caught.value)


def test_open_store_memory_url_gives_a_memory_store() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


def test_open_store_file_url_gives_a_file_store(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'ckpt'}")

    assert isinstance(store, FileStore)
    assert (tmp_path / "ckpt").is_dir()


def test_open_store_plain_path_gives_a_file_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "plain"))

    assert isinstance(store, FileStore)
    assert (tmp_path / "plain").is_dir()


def test_open_store_relative_plain_path_gives_a_file_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("relative/dir")

    assert isinstance(store, FileStore)
    assert (tmp_path / "relative" / "dir").is_dir()


class RemoteProbe:
    """Stands in for a remote store: records what ``open_store`` hands its ``from_url``."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RemoteProbe:
        return cls(url, options)


def test_open_store_hands_remote_stores_the_retry_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastcheckpoint.stores as stores_module

    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("probe", f"{__name__}:RemoteProbe", remote=True)
    policy = RetryPolicy(base_delay=0.2, max_delay=2.0, max_retries=7)

    default = cast(RemoteProbe, open_store("probe://x", timeout=3))
    chosen = cast(RemoteProbe, open_store("probe://x", retry=policy))

    assert default.options == {"timeout": 3, "retry": RetryPolicy()}
    assert chosen.options == {"retry": policy}


def test_manager_from_env_passes_its_retry_policy_to_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fastcheckpoint.stores as stores_module

    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("probe", f"{__name__}:RemoteProbe", remote=True)
    seen: list[RemoteProbe] = []

    def remember(url: str, **options: Any) -> RemoteProbe:
        probe = RemoteProbe(url, options)
        seen.append(probe)
        return probe

    monkeypatch.setattr(RemoteProbe, "from_url", staticmethod(remember))
    with pytest.raises(ConfigurationError, match="CheckpointStore"):
        CheckpointManager.from_env(
            {"FASTCHECKPOINT_URL": "probe://x", "FASTCHECKPOINT_RETRY_MAX_RETRIES": "9"}
        )

    assert seen[0].options == {"retry": RetryPolicy(max_retries=9)}


def test_manager_from_env_production_builds_the_dynamodb_store() -> None:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    manager = CheckpointManager.from_env({
        "CHECKPOINT_MODE": "production",
        "CHECKPOINT_TABLE_NAME": "agent-checkpoints",
        "CHECKPOINT_S3_BUCKET": "agent-blobs",
        "CHECKPOINT_TTL_DAYS": "90",
        "AWS_DEFAULT_REGION": "eu-west-1",
    })

    assert isinstance(manager.store, DynamoDBStore)
    assert manager.config.default_ttl_seconds == 90 * 86400


@pytest.mark.parametrize("days", ["1e300", "1e306"])
def test_a_ttl_in_days_too_long_to_store_is_a_configuration_error_naming_it(days: str) -> None:
    """Finite days, but seconds beyond what a store can hold (or beyond a float)."""
    with pytest.raises(ConfigurationError, match="CHECKPOINT_TTL_DAYS"):
        CheckpointManager.from_env({"FASTCHECKPOINT_URL": "memory://",
                                    "CHECKPOINT_TTL_DAYS": days})


@pytest.mark.parametrize("missing", ["CHECKPOINT_TABLE_NAME", "CHECKPOINT_S3_BUCKET"])
def test_manager_from_env_production_names_what_is_missing(missing: str) -> None:
    env = {"CHECKPOINT_MODE": "production", "CHECKPOINT_TABLE_NAME": "t",
           "CHECKPOINT_S3_BUCKET": "b"}
    del env[missing]

    with pytest.raises(ConfigurationError, match=missing):
        CheckpointManager.from_env(env)


def test_available_schemes_lists_every_bundled_store() -> None:
    from fastcheckpoint.stores import available_schemes

    schemes = available_schemes()
    assert {"memory", "file", "redis", "rediss", "redis+cluster", "s3", "dynamodb"} <= set(
        schemes
    )
    assert schemes == sorted(schemes)


def test_a_registered_store_without_its_package_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fastcheckpoint.stores as stores_module

    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("thirdparty", "fc_thirdparty_store_not_installed:Store")

    with pytest.raises(ConfigurationError, match="pip install fc_thirdparty_store_not_installed"):
        open_store("thirdparty://x")


def test_register_store_refuses_to_replace_a_scheme_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fastcheckpoint.stores as stores_module

    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    with pytest.raises(ConfigurationError, match=r"registered to fastcheckpoint\.stores\.redis"):
        register_store("redis", "my_package.store:MyStore")
    register_store("memory", "fastcheckpoint.stores.memory:MemoryStore")  # the same: harmless
    register_store("redis", "fastcheckpoint.stores.memory:MemoryStore", replace=True)

    assert isinstance(open_store("redis://x"), MemoryStore)


@pytest.mark.parametrize("target", ["no-colon", "a:b:c", 7])
def test_register_store_refuses_a_malformed_target(target: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"package\.module:Class"):
        register_store("mystore", target)


def test_stores_are_discovered_from_the_entry_point_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata

    import fastcheckpoint.stores as stores_module

    class Remote(MemoryStore):
        remote = True
        seen: ClassVar[dict[str, Any]] = {}

        @classmethod
        def from_url(cls, url: str, **options: Any) -> Remote:
            cls.seen.update(options)
            return cls()

    module = types.ModuleType("fc_entry_point_store")
    module.Remote = Remote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fc_entry_point_store", module)
    entries = [
        importlib.metadata.EntryPoint("viaplugin", "fc_entry_point_store:Remote",
                                      "fastcheckpoint.stores"),
        importlib.metadata.EntryPoint("redis", "fc_entry_point_store:Remote",
                                      "fastcheckpoint.stores"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: entries if group == "fastcheckpoint.stores" else [])
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    monkeypatch.setattr(stores_module, "_ENTRY_POINTS", set())
    stores_module._discover.cache_clear()
    try:
        assert "viaplugin" in stores_module.available_schemes()
        store = open_store("viaplugin://x")
        assert stores_module._REGISTRY["redis"].target == "fastcheckpoint.stores.redis:RedisStore"
    finally:
        stores_module._discover.cache_clear()

    assert isinstance(store, Remote)
    assert isinstance(Remote.seen["retry"], RetryPolicy)  # a remote class gets the policy
