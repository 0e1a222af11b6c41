"""A clean install works: the built wheel in fresh virtualenvs, with no extras and each extra alone.

``make test`` runs in .venv with ``[dev]``, which brings packages the library must not rely on
(trio once hid an undeclared import). Here the wheel is built from the checkout and installed
into fresh venvs: one without extras, one per extra. Every dependency is resolved once per
session against the index into a wheelhouse (pip's cache makes that cheap after the first run),
and the venvs install from it offline, in parallel. They get no pip of their own: the outer pip
installs into them with ``--python``. Code runs there with ``python -I`` from a directory
outside the checkout, so neither the working tree nor .venv is importable.

S3 and DynamoDB talk to a moto server started by this session (moto is installed only here,
not in the fresh venvs); Redis to the test server the Redis store tests use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import anyio
import pytest

from fastcheckpoint import CheckpointManager, CheckpointStatus, FileStore
from tests.stores._moto import REGION, moto_endpoint, unique_name  # noqa: F401
from tests.stores._postgres_server import PostgresTarget, drop_schema, session_target, unique_schema
from tests.stores._redis_support import delete_prefix, unique_prefix
from tests.stores.conftest import RedisTarget, redis_target  # noqa: F401

pytestmark = pytest.mark.slow  # about 10 s on an idle machine: pip builds and installs

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("none", "redis", "s3", "dynamodb", "postgres", "langgraph", "agent-framework",
          "pydantic-ai", "openai-agents", "google-adk")
INSTALL_TIMEOUT = 600  # seconds; a cold pip cache downloads every dependency once
RUN_TIMEOUT = 120


def readme_quick_start() -> str:
    """The README's quick start, taken from the README itself so the test cannot drift."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, "README.md: no ```python block under '## Quick start'"
    return match.group(1)


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]


def checked(command: list[str]) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


class Venv:
    """A fresh virtualenv with the wheel installed, plus a scratch directory to run in."""

    def __init__(self, root: Path, extra: str) -> None:
        self.extra = extra
        self.path = root / f"venv-{extra}"
        self.work = root / f"work-{extra}"
        self.python = self.path / "bin" / "python"

    def requirement(self, wheel: Path) -> str:
        return str(wheel) if self.extra == "none" else f"{wheel}[{self.extra}]"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -I ARGS`` in this venv, from its scratch directory."""
        return self.command([str(self.python), "-I", *args])

    def command(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FASTCHECKPOINT_")}
        clean.pop("VIRTUAL_ENV", None)
        clean.pop("PYTHONPATH", None)
        return subprocess.run(
            command,
            cwd=self.work,
            env=clean,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )

    def script(self, source: str, *args: str) -> subprocess.CompletedProcess[str]:
        path = self.work / "check.py"
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return self.run(str(path), *args)


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Venv]:
    """Build the wheel, resolve every extra into a wheelhouse, then install the venvs at once."""
    root = tmp_path_factory.mktemp("install")
    dist, wheelhouse = root / "dist", root / "wheelhouse"
    checked(pip("wheel", "--no-deps", "-w", str(dist), str(ROOT)))
    (wheel,) = dist.glob("fastcheckpoint-*.whl")
    checked(pip("wheel", "-w", str(wheelhouse), f"{wheel}[{','.join(EXTRAS[1:])}]"))

    made = {extra: Venv(root, extra) for extra in EXTRAS}
    installs = []
    for venv in made.values():
        venv.work.mkdir()
        checked([sys.executable, "-m", "venv", "--without-pip", str(venv.path)])
        command = pip(
            "--python", str(venv.python), "install", "--no-index",
            "--find-links", str(wheelhouse), venv.requirement(wheel),
        )
        installs.append((command, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True)))
    for command, process in installs:
        output, _ = process.communicate(timeout=INSTALL_TIMEOUT)
        assert process.returncode == 0, f"{' '.join(command)}\n{output}"
    return made


IMPORTABLE = """
    import importlib.util, sys
    import fastcheckpoint
    print(fastcheckpoint.__file__)
    print(*[name for name in sys.argv[1:] if importlib.util.find_spec(name)])
"""

WRONG_EXTRA = """
    import sys
    from fastcheckpoint import ConfigurationError, open_store
    for url in sys.argv[1:]:
        try:
            open_store(url)
        except ConfigurationError as exc:
            print(exc)
        else:
            print("opened", url)
"""


def test_no_extras_imports_only_its_declared_dependencies(venvs: dict[str, Venv]) -> None:
    venv = venvs["none"]
    result = venv.script(IMPORTABLE, "redis", "aiobotocore", "botocore", "asyncpg", "langgraph",
                         "langchain_core", "trio", "pytest")

    assert result.returncode == 0, result.stderr
    location, found = result.stdout.splitlines()
    assert Path(location).is_relative_to(venv.path), "imported fastcheckpoint from elsewhere"
    assert found == "", f"the no-extras venv has packages it should not: {found}"


def test_no_extras_runs_the_readme_quick_start_on_a_file_store(venvs: dict[str, Venv]) -> None:
    venv = venvs["none"]
    quick_start = venv.work / "quick_start.py"
    quick_start.write_text(readme_quick_start(), encoding="utf-8")

    first = venv.run(str(quick_start))
    again = venv.run(str(quick_start))  # "run it again: it picks up after the last step"

    assert first.returncode == 0, first.stdout + first.stderr
    assert again.returncode == 0, again.stdout + again.stderr
    steps, status = anyio.run(read_back, venv.work / "checkpoints", "run-123")
    assert steps == ["plan", "search", "draft"]
    assert status is CheckpointStatus.COMPLETED


async def read_back(directory: Path, run_id: str) -> tuple[list[str], CheckpointStatus | None]:
    """What the venv's quick start left, read with the checkout's own code."""
    with anyio.fail_after(10):
        manager = CheckpointManager(FileStore(directory))
        history = await manager.list_checkpoints(run_id)
        run = await manager.get_run(run_id)
        await manager.aclose()
    return [meta.step_name for meta in reversed(history)], run.status if run else None


PUBLIC_NAMES = """
    import fastcheckpoint
    from fastcheckpoint import *
    from fastcheckpoint import MAX_TTL_SECONDS, SQLiteStore
    print(hasattr(fastcheckpoint, "RedisStore"), hasattr(fastcheckpoint, "SQLiteStore"))
    print(*sorted(name for name in dir(fastcheckpoint) if name.endswith("Store")))
    try:
        from fastcheckpoint import PostgresStore
    except fastcheckpoint.ConfigurationError as exc:
        print(exc)
"""


def test_no_extras_star_import_and_hasattr_skip_the_stores_of_extras(
    venvs: dict[str, Venv]
) -> None:
    result = venvs["none"].script(PUBLIC_NAMES)

    assert result.returncode == 0, result.stderr
    found, listed, refused = result.stdout.splitlines()
    assert found == "False True"
    assert listed.split() == ["CheckpointStore", "FileCheckpointStore", "FileStore",
                              "InMemoryCheckpointStore", "MemoryStore", "SQLiteStore"]
    assert "pip install 'fastcheckpoint[postgres]'" in refused


def test_no_extras_cli_help(venvs: dict[str, Venv]) -> None:
    venv = venvs["none"]
    result = venv.command([str(venv.path / "bin" / "fastcheckpoint"), "--help"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("usage: fastcheckpoint")
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("extra", "urls", "needed"),
    [
        ("none", ["redis://127.0.0.1:1/0", "s3://b", "dynamodb://T?bucket=b",
                  "postgresql://127.0.0.1:1/db"],
         ["redis", "s3", "dynamodb", "postgres"]),
        ("redis", ["s3://b", "dynamodb://T?bucket=b"], ["s3", "dynamodb"]),
        ("s3", ["redis://127.0.0.1:1/0"], ["redis"]),
    ],
)
def test_a_store_without_its_extra_names_the_install_command(
    venvs: dict[str, Venv], extra: str, urls: list[str], needed: list[str]
) -> None:
    result = venvs[extra].script(WRONG_EXTRA, *urls)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(urls)
    for line, name in zip(lines, needed, strict=True):
        assert f"pip install 'fastcheckpoint[{name}]'" in line, line


ROUND_TRIP = """
    import sys
    import anyio
    from fastcheckpoint import CheckpointManager, open_store

    async def main(url: str) -> None:
        store = open_store(url)
        if hasattr(store, "provision"):
            await store.provision()
        manager = CheckpointManager(store)
        created = await manager.create("install-check", state={"extra": sys.argv[2]})
        restored = await manager.restore("install-check")
        assert restored is not None and restored.state == {"extra": sys.argv[2]}, restored
        await manager.aclose()
        print(type(store).__name__, created.checkpoint_id)

    anyio.run(main, sys.argv[1])
"""


def round_trip(venv: Venv, url: str) -> str:
    result = venv.script(ROUND_TRIP, url, venv.extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def redis_url(redis_target: RedisTarget) -> Iterator[str]:  # noqa: F811
    if redis_target.kind == "fakeredis":
        pytest.skip("no redis-server here: the fresh venv cannot reach fakeredis")
    prefix = unique_prefix(redis_target)
    yield f"{redis_target.url}?prefix={prefix}"
    anyio.run(drop_keys, redis_target.url, prefix)


async def drop_keys(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    with anyio.fail_after(10):
        client = aioredis.Redis.from_url(url)
        await delete_prefix(client, prefix)
        await client.aclose()


def test_redis_extra_alone_opens_its_store(venvs: dict[str, Venv], redis_url: str) -> None:
    assert round_trip(venvs["redis"], redis_url).startswith("RedisStore ")


def test_s3_extra_alone_opens_its_store(
    venvs: dict[str, Venv], moto_endpoint: str  # noqa: F811
) -> None:
    query = urlencode({"region": REGION, "endpoint_url": moto_endpoint})
    url = f"s3://{unique_name('install')}/agents?{query}"

    assert round_trip(venvs["s3"], url).startswith("S3Store ")


def test_dynamodb_extra_alone_opens_its_store(
    venvs: dict[str, Venv], moto_endpoint: str  # noqa: F811
) -> None:
    query = urlencode(
        {"bucket": unique_name("install"), "region": REGION, "endpoint_url": moto_endpoint}
    )
    url = f"dynamodb://{unique_name('install')}?{query}"

    assert round_trip(venvs["dynamodb"], url).startswith("DynamoDBStore ")


def test_no_extras_opens_a_sqlite_store(venvs: dict[str, Venv]) -> None:
    venv = venvs["none"]
    url = f"sqlite:///{venv.work / 'checkpoints.db'}"

    assert round_trip(venv, url).startswith("SQLiteStore ")


@pytest.fixture
def postgres_url(pytestconfig: pytest.Config) -> Iterator[str]:
    target: PostgresTarget = session_target(pytestconfig)
    schema = unique_schema()
    yield f"{target.url()}?schema={schema}"
    anyio.run(drop_schema, target, schema)


def test_postgres_extra_alone_opens_its_store(venvs: dict[str, Venv], postgres_url: str) -> None:
    assert round_trip(venvs["postgres"], postgres_url).startswith("PostgresStore ")


SAVER = """
    import sys
    import anyio
    from langgraph.checkpoint.base import empty_checkpoint
    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

    async def main(url: str) -> None:
        async with FastCheckpointSaver(url) as saver:
            config = {"configurable": {"thread_id": "install", "checkpoint_ns": ""}}
            checkpoint = empty_checkpoint()
            saved = await saver.aput(config, checkpoint, {"step": 0}, {})
            found = await saver.aget_tuple(saved)
            assert found is not None and found.checkpoint["id"] == checkpoint["id"], found
            print("saved", found.config["configurable"]["checkpoint_id"])

    anyio.run(main, sys.argv[1])
"""


AGENT_FRAMEWORK = """
    import sys
    import anyio
    from agent_framework import WorkflowCheckpoint
    from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

    async def main(url: str) -> None:
        async with FastCheckpointStorage(url) as storage:
            saved = await storage.save(WorkflowCheckpoint(
                workflow_name="install", graph_signature_hash="h", state={"n": 1}))
            loaded = await storage.load(saved)
            assert loaded.state == {"n": 1}, loaded.state
            print("saved", saved)

    anyio.run(main, sys.argv[1])
"""


PYDANTIC_AI = """
    import sys
    import anyio
    from pydantic_ai import Agent
    from pydantic_ai.conversation import Conversation
    from pydantic_ai.models.test import TestModel
    from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

    async def main(url: str) -> None:
        agent = Agent(TestModel(custom_output_text="noted"))
        async with FastConversationStore(url) as store:
            result = await agent.run("hello", conversation=Conversation(conversation_id="c"))
            await store.save(result)
        async with FastConversationStore(url) as store:
            loaded = await store.load("c")
            assert loaded is not None and len(loaded.messages) == 2, loaded
            print("saved", len(loaded.messages))

    anyio.run(main, sys.argv[1])
"""


OPENAI_AGENTS = """
    import sys
    import anyio
    from fastcheckpoint.integrations.openai_agents import FastSession

    async def main(url: str) -> None:
        async with FastSession("install", url) as session:
            await session.add_items([{"role": "user", "content": "hi"}])
        async with FastSession("install", url) as session:
            items = await session.get_items()
            assert items == [{"role": "user", "content": "hi"}], items
            assert await session.pop_item() == items[0]
            print("saved", len(items))

    anyio.run(main, sys.argv[1])
"""


GOOGLE_ADK = """
    import sys
    import anyio
    from google.adk.events import Event
    from fastcheckpoint.integrations.google_adk import FastSessionService

    async def main(url: str) -> None:
        service = FastSessionService(url)
        session = await service.create_session(app_name="app", user_id="u", state={"n": 1})
        await service.append_event(session, Event(author="user", invocation_id="i"))
        await service.aclose()
        service = FastSessionService(url)
        found = await service.get_session(app_name="app", user_id="u", session_id=session.id)
        assert found is not None and found.state == {"n": 1}, found
        assert len(found.events) == 1, found.events
        await service.aclose()
        print("saved", len(found.events))

    anyio.run(main, sys.argv[1])
"""


ADAPTER_SCRIPTS = {
    "langgraph": SAVER,
    "agent-framework": AGENT_FRAMEWORK,
    "pydantic-ai": PYDANTIC_AI,
    "openai-agents": OPENAI_AGENTS,
    "google-adk": GOOGLE_ADK,
}
"""Each framework extra alone: its adapter saves and reads back on an SQLite store."""


@pytest.mark.parametrize("extra", sorted(ADAPTER_SCRIPTS))
def test_a_framework_extra_alone_runs_its_adapter(venvs: dict[str, Venv], extra: str) -> None:
    venv = venvs[extra]
    result = venv.script(ADAPTER_SCRIPTS[extra], f"sqlite:///{venv.work / 'adapter.db'}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("saved ")


NO_FRAMEWORK = """
    import importlib, sys
    from fastcheckpoint import ConfigurationError
    try:
        importlib.import_module(sys.argv[1])
    except ConfigurationError as exc:
        print(exc)
"""


@pytest.mark.parametrize(("module", "extra"), [
    ("fastcheckpoint.integrations.langgraph", "langgraph"),
    ("fastcheckpoint.integrations.agent_framework", "agent-framework"),
    ("fastcheckpoint.integrations.pydantic_ai", "pydantic-ai"),
    ("fastcheckpoint.integrations.openai_agents", "openai-agents"),
    ("fastcheckpoint.integrations.crewai", "crewai"),
    ("fastcheckpoint.integrations.google_adk", "google-adk"),
])
def test_an_adapter_without_its_extra_names_the_install_command(
    venvs: dict[str, Venv], module: str, extra: str
) -> None:
    result = venvs["none"].script(NO_FRAMEWORK, module)

    assert result.returncode == 0, result.stderr
    assert f"pip install 'fastcheckpoint[{extra}]'" in result.stdout
