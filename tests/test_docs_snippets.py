"""Every ```python block of README.md and docs/**/*.md runs, so the docs cannot drift.

How a page runs
---------------
- Its blocks run in order, in one namespace, from a fresh scratch directory (the current
  directory), as a reader would paste them. Top-level ``await``, ``async with`` and
  ``async for`` work (on asyncio); a block without them runs in a worker thread, so it may call
  ``anyio.run``. Each block has a deadline.
- The namespace starts with this prelude:

  - every public name of ``fastcheckpoint``, and ``anyio``;
  - ``store``, a store of the kind under test, and ``manager = CheckpointManager(store)``;
  - ``run_id = "run-1"`` and ``state = {"step": 1}``.

  A page whose code names Redis runs with a Redis server on localhost:6379, the address docs
  use (the shared one when it answers, else one this module starts there), and also gets
  ``redis`` (with ``redis.asyncio`` imported) and ``client``, a ``redis.asyncio.Redis`` on it.
  A page whose code names S3 or DynamoDB runs with AWS pointed at a moto server
  (``AWS_ENDPOINT_URL``, fake credentials) and gets ``my_aiobotocore_session`` and
  ``s3_client``, an aiobotocore S3 client.
- A store's page (``docs/stores/<store>.md``) runs on that store. Every other page runs on a
  memory and on a file store, and also on Redis, S3 or DynamoDB when its code names them.
- ``FASTCHECKPOINT_*`` and ``CHECKPOINT_*`` variables are unset while a page runs; what a page
  changes in the environment, the store registry (``register_store``) and ``sys.modules``
  (stand-in modules made by hand) is undone after it.
- ``print(...)  # text``: a comment after a print states a line that it prints; it is checked.
- After the last block, a ``manager`` left in the namespace must create and restore a
  checkpoint (so a page that builds a store proves the store works); then every manager and
  store left in the namespace is closed.

Markers: HTML comments in the Markdown source, invisible on the rendered page
---------------------------------------------------------------------------
- ``<!-- snippet: skip REASON -->`` directly above a block: do not run it. The reason is
  required; keep skips rare.
- ``<!-- snippet: run CODE -->`` (CODE may span lines): hidden Python run at that point, in the
  page's namespace: setup for the next block, or checks of the previous one.
- ``<!-- snippet: env -->`` directly above a ```sh block: its ``export NAME=value`` and
  ``unset NAME`` lines apply to the environment of the blocks after it.
- ``<!-- snippet: paths /var/lib/ckpt ... -->`` anywhere on a page: these absolute paths, in
  every block and ``env`` line of the page, mean the same path under the scratch directory.
  Docs never touch the machine's own directories: any other absolute path fails the page.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import io
import os
import re
import secrets
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

import fastcheckpoint
import fastcheckpoint.stores as stores_module
from fastcheckpoint import CheckpointManager, CheckpointStore, FileStore, MemoryStore
from tests.stores._moto import REGION, moto_endpoint, unique_name  # noqa: F401
from tests.stores._redis_servers import (
    SHARED_HOST,
    SHARED_PORT,
    PrivateRedis,
    answers_ping,
    redis_binary,
    session_prefix,
)
from tests.stores.conftest import RedisTarget

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
DEADLINE = 60.0  # seconds per block; provisioning on moto takes a few

STORE_KINDS = ("memory", "file", "redis", "s3", "dynamodb")
KIND_PATTERNS = {
    "redis": re.compile(r"redis", re.IGNORECASE),
    "s3": re.compile(r"s3://|S3Store|S3CheckpointStore|\bs3_client\b"),
    "dynamodb": re.compile(r"dynamodb|CHECKPOINT_MODE=production", re.IGNORECASE),
}
PRINT_CLAIM = re.compile(r"^\s*print\(.*\)\s+#\s*(?P<claim>.+?)\s*$")
FENCE = re.compile(r"^```(?P<info>[^\s`]*)(?:\s.*)?$")
MARKER_START = re.compile(r"^<!--\s*snippet:\s*(?P<directive>\w+)(?P<rest>.*)$")


# -- parsing ------------------------------------------------------------------------------------


@dataclass
class Step:
    """One thing to do on a page: a ``python`` block, hidden ``run`` code, an ``env`` block, or
    a ``skip``ped block."""

    kind: str
    line: int  # 1-based line of the page where the code starts
    text: str  # code; for a skip, the reason


@dataclass
class Page:
    path: str
    steps: list[Step] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def code(self) -> str:
        return "\n".join(step.text for step in self.steps if step.kind != "skip")

    def kinds(self) -> list[str]:
        """The prelude stores this page runs on."""
        own = Path(self.path)
        if own.parent == Path("docs/stores") and own.stem in STORE_KINDS:
            return [own.stem]
        return ["memory", "file", *[k for k, p in KIND_PATTERNS.items() if p.search(self.code)]]

    def names(self, kind: str) -> bool:
        return kind in self.kinds() or bool(KIND_PATTERNS[kind].search(self.code))

    @property
    def needs_redis(self) -> bool:
        return self.names("redis")

    @property
    def needs_aws(self) -> bool:
        return self.names("s3") or self.names("dynamodb")


class MarkupError(Exception):
    """A marker that cannot be applied; the message names the page and line."""


@dataclass(frozen=True)
class Pending:
    """A skip or env marker waiting for the block below it."""

    directive: str
    line: int
    reason: str = ""

    def misplaced(self, page: Page) -> MarkupError:
        return MarkupError(f"{page.path}:{self.line}: '{self.directive}' marker not above a block")


def parse_page(path: str) -> Page:
    return parse_text(path, (ROOT / path).read_text(encoding="utf-8"))


def parse_text(path: str, text: str) -> Page:
    lines = text.splitlines()
    page = Page(path)
    pending: Pending | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if marker := MARKER_START.match(line):
            end = next((i for i in range(index, len(lines)) if "-->" in lines[i]), None)
            if end is None:
                raise MarkupError(f"{path}:{index + 1}: snippet marker without -->")
            body = "\n".join([marker["rest"], *lines[index + 1 : end + 1]])
            body = body[: body.rindex("-->")]
            pending = apply_marker(page, marker["directive"], body, index + 1, pending)
            index = end + 1
            continue
        if fence := FENCE.match(line):
            end = next((i for i in range(index + 1, len(lines)) if lines[i] == "```"), None)
            if end is None:
                raise MarkupError(f"{path}:{index + 1}: code block without a closing ```")
            add_block(page, fence["info"], "\n".join(lines[index + 1 : end]), index + 2, pending)
            pending = None
            index = end + 1
            continue
        if line.strip() and pending is not None:
            raise pending.misplaced(page)
        index += 1
    if pending is not None:
        raise pending.misplaced(page)
    return page


def apply_marker(
    page: Page, directive: str, body: str, line: int, pending: Pending | None
) -> Pending | None:
    where = f"{page.path}:{line}"
    if directive == "run":
        first, _, rest = body.partition("\n")
        code, start = (first.strip(), line) if first.strip() else (rest, line + 1)
        page.steps.append(Step("run", start, code.rstrip()))
        return pending
    if pending is not None:
        raise pending.misplaced(page)
    if directive == "skip":
        reason = " ".join(body.split())
        if not reason:
            raise MarkupError(f"{where}: a skip needs its reason: <!-- snippet: skip REASON -->")
        return Pending("skip", line, reason)
    if directive == "env":
        return Pending("env", line)
    if directive == "paths":
        page.paths.extend(body.split())
        if not page.paths or not all(p.startswith("/") for p in page.paths):
            raise MarkupError(f"{where}: paths takes absolute paths")
        return None
    raise MarkupError(f"{where}: unknown snippet marker {directive!r} (skip, run, env, paths)")


def add_block(page: Page, info: str, code: str, line: int, pending: Pending | None) -> None:
    if pending is None:
        if info == "python":
            page.steps.append(Step("python", line, code))
        return
    wanted = ("python",) if pending.directive == "skip" else ("sh", "bash")
    if info not in wanted:
        raise MarkupError(
            f"{page.path}:{pending.line}: {pending.directive} marker above a {info} block")
    if pending.directive == "skip":
        page.steps.append(Step("skip", line, pending.reason))
    else:
        page.steps.append(Step("env", line, code))


def env_changes(step: Step, page: Page) -> list[tuple[str, str | None]]:
    """``(name, value)`` per ``export`` line, ``(name, None)`` per name of an ``unset`` line."""
    changes: list[tuple[str, str | None]] = []
    for offset, raw in enumerate(step.text.splitlines()):
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        if words[0] == "export" and len(words) == 2 and "=" in words[1]:
            name, value = words[1].split("=", 1)
            check_paths(step, page, [value])
            changes.append((name, moved(value, page)))
        elif words[0] == "unset" and len(words) > 1:
            changes.extend((name, None) for name in words[1:])
        else:
            raise MarkupError(f"{page.path}:{step.line + offset}: not an export or unset line")
    return changes


def check_paths(step: Step, page: Page, values: list[str]) -> None:
    """Docs never touch the machine's own directories: absolute paths need a ``paths`` marker."""
    for value in values:
        path = value.removeprefix("file://")
        if len(path) > 1 and path.startswith("/") and not any(
            path == p or path.startswith(p.rstrip("/") + "/") for p in page.paths
        ):
            raise MarkupError(
                f"{page.path}:{step.line}: absolute path {path!r} outside the scratch "
                f"directory; add <!-- snippet: paths {path} --> to the page"
            )


def string_constants(source: str) -> list[str]:
    return [
        node.value for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def moved(text: str, page: Page) -> str:
    """``text`` with the page's ``paths`` moved under the scratch directory (the cwd)."""
    for path in page.paths:
        text = text.replace(path, os.getcwd() + path)
    return text


# -- running ------------------------------------------------------------------------------------


class PageRun:
    """Runs one page's steps in one namespace; async code on one event loop (the portal's)."""

    def __init__(self, page: Page, portal: BlockingPortal, namespace: dict[str, Any]) -> None:
        self.page = page
        self.portal = portal
        self.namespace = namespace

    def run(self, step: Step) -> str:
        """Run a python or run step; returns what it printed."""
        check_paths(step, self.page, string_constants(step.text))
        source = "\n" * (step.line - 1) + moved(step.text, self.page)
        # The page's own path as the file name: tracebacks show the Markdown lines.
        code = compile(
            source, str(ROOT / self.page.path), "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True,
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if code.co_flags & inspect.CO_COROUTINE:
                self.portal.call(self._await, code)
            else:
                self.portal.call(self._in_thread, code)
        return out.getvalue()

    async def _await(self, code: Any) -> None:
        with anyio.fail_after(DEADLINE):
            await eval(code, self.namespace)

    async def _in_thread(self, code: Any) -> None:
        with anyio.fail_after(DEADLINE):
            run = functools.partial(exec, code, self.namespace)
            await anyio.to_thread.run_sync(run, abandon_on_cancel=True)

    def call(self, function: Any, *args: Any) -> Any:
        return self.portal.call(function, *args)


def check_print_claims(step: Step, printed: str, page: Page) -> None:
    lines = [line.strip() for line in printed.splitlines()]
    for offset, source_line in enumerate(step.text.splitlines()):
        if claim := PRINT_CLAIM.match(source_line):
            assert claim["claim"] in lines, (
                f"{page.path}:{step.line + offset}: the comment says this prints "
                f"{claim['claim']!r}; the block printed {lines}"
            )


# -- the environment of a page ------------------------------------------------------------------


@dataclass
class Services:
    """What a page may use besides its prelude store."""

    redis: RedisTarget | None = None
    moto: str | None = None


def make_prelude_store(
    kind: str, scratch: Path, services: Services
) -> tuple[CheckpointStore, str | None]:
    """The page's ``store``, and for Redis the key prefix to drop afterwards."""
    if kind == "memory":
        return MemoryStore(), None
    if kind == "file":
        return FileStore(scratch / ".prelude-store", fsync=False), None
    if kind == "redis":
        from tests.stores._redis_support import make_store, unique_prefix

        assert services.redis is not None
        prefix = unique_prefix(services.redis)
        return make_store(services.redis, prefix), prefix
    assert services.moto is not None
    if kind == "s3":
        from fastcheckpoint.stores.s3 import S3Store

        return S3Store(unique_name("snip"), "docs", region=REGION, endpoint_url=services.moto), None
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    table, bucket = unique_name("snip"), unique_name("snip")
    return DynamoDBStore(table, bucket=bucket, region=REGION, endpoint_url=services.moto), None


async def prelude(
    namespace: dict[str, Any], store: CheckpointStore, page: Page, services: Services,
    stack: contextlib.AsyncExitStack,
) -> None:
    namespace.update({name: getattr(fastcheckpoint, name) for name in fastcheckpoint.__all__})
    namespace.update(__name__="__main__", anyio=anyio, store=store, run_id="run-1",
                     state={"step": 1}, manager=CheckpointManager(store))
    if hasattr(store, "provision"):
        await store.provision()
    if page.needs_redis:
        import redis.asyncio

        assert services.redis is not None
        namespace["redis"] = redis
        namespace["client"] = redis.asyncio.Redis.from_url(services.redis.url)
        stack.push_async_callback(namespace["client"].aclose)
    if page.needs_aws:
        from aiobotocore.session import get_session

        session = get_session()
        namespace["my_aiobotocore_session"] = session
        namespace["s3_client"] = await stack.enter_async_context(
            session.create_client("s3", region_name=REGION, endpoint_url=services.moto)
        )


async def round_trip(manager: CheckpointManager) -> None:
    """The page's last ``manager`` works: create, restore, delete a run of its own."""
    run = f"snippet-check-{secrets.token_hex(6)}"
    with anyio.fail_after(DEADLINE):
        created = await manager.create(run, {"ok": True}, force=True)
        restored = await manager.restore(run)
        assert created is not None
        assert restored is not None
        assert restored.checkpoint_id == created.checkpoint_id
        assert restored.state == {"ok": True}
        assert await manager.delete_run(run) == 1


async def close_all(namespace: dict[str, Any], prelude_store: CheckpointStore) -> None:
    """Stop every manager's cleanup loop and close every store the page left behind."""
    with anyio.fail_after(DEADLINE):
        values = [v for v in namespace.values() if not isinstance(v, type)]
        managers = [v for v in values if isinstance(v, CheckpointManager)]
        found = [m.store for m in managers] + [v for v in values if isinstance(v, CheckpointStore)]
        unique = {id(s): s for s in [*found, prelude_store]}
        for manager in managers:
            await manager.stop()
        for store in unique.values():
            await store.aclose()


@contextlib.contextmanager
def page_environment(
    page: Page, scratch: Path, services: Services, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.chdir(scratch)
    for name in list(os.environ):
        if name.startswith(("FASTCHECKPOINT_", "CHECKPOINT_", "AWS_ENDPOINT_URL")):
            monkeypatch.delenv(name)
    if services.moto is not None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", services.moto)
    # register_store calls on a page stay on that page.
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    saved = dict(os.environ)  # env blocks change it as the page goes
    modules = set(sys.modules)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        # Modules a page made by hand (no spec: types.ModuleType stand-ins) leave with it.
        for name in set(sys.modules) - modules:
            if getattr(sys.modules[name], "__spec__", None) is None:
                del sys.modules[name]


@pytest.fixture(scope="module")
def docs_redis() -> Iterator[RedisTarget]:
    """A Redis server at the docs' address, localhost:6379."""
    url = f"redis://{SHARED_HOST}:{SHARED_PORT}/0"
    if answers_ping(SHARED_HOST, SHARED_PORT):
        yield RedisTarget("shared", url, session_prefix())
        return
    if redis_binary() is None:
        pytest.skip("no Redis at localhost:6379 and no redis-server to start there")
    server = PrivateRedis(SHARED_PORT)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.skip(f"could not start redis-server on localhost:6379: {exc}")
    try:
        yield RedisTarget("private", url, session_prefix())
    finally:
        server.stop()


def services_for(page: Page, kind: str, request: pytest.FixtureRequest) -> Services:
    services = Services()
    if page.needs_redis or kind == "redis":
        services.redis = request.getfixturevalue("docs_redis")
    if page.needs_aws or kind in ("s3", "dynamodb"):
        services.moto = request.getfixturevalue("moto_endpoint")
    return services


def run_page(page: Page, kind: str, scratch: Path, services: Services) -> None:
    with start_blocking_portal("asyncio") as portal:
        namespace: dict[str, Any] = {}
        store, redis_prefix = make_prelude_store(kind, scratch, services)
        runner = PageRun(page, portal, namespace)
        stack = contextlib.AsyncExitStack()
        try:
            runner.call(prelude, namespace, store, page, services, stack)
            for step in page.steps:
                run_step(runner, step, page)
            if isinstance(namespace.get("manager"), CheckpointManager):
                runner.call(round_trip, namespace["manager"])
        finally:
            if redis_prefix is not None:
                runner.call(drop_redis_keys, store, redis_prefix)
            runner.call(close_all, namespace, store)
            runner.call(stack.aclose)


def run_step(runner: PageRun, step: Step, page: Page) -> None:
    if step.kind == "env":
        for name, value in env_changes(step, page):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return
    if step.kind == "skip":
        return
    printed = runner.run(step)
    check_print_claims(step, printed, page)


async def drop_redis_keys(store: Any, prefix: str) -> None:
    from tests.stores._redis_support import delete_prefix

    with anyio.fail_after(DEADLINE):
        await delete_prefix(store._client, prefix)


# -- tests --------------------------------------------------------------------------------------


# Pages whose owners have yet to add the markers they need: strict, so the entry goes once the
# page runs.
AWAITING_MARKERS: dict[str, str] = {}

PARSED = {path: parse_page(path) for path in PAGES}
CASES = [
    pytest.param(
        path, kind, id=f"{path}-{kind}",
        marks=[pytest.mark.xfail(reason=AWAITING_MARKERS[path], strict=True)]
        if path in AWAITING_MARKERS else [],
    )
    for path, page in PARSED.items() for kind in page.kinds()
    if any(step.kind == "python" for step in page.steps)
]


@pytest.mark.parametrize(("path", "kind"), CASES)
def test_page_snippets_run(
    path: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    page = PARSED[path]
    services = services_for(page, kind, request)
    with page_environment(page, tmp_path, services, monkeypatch):
        run_page(page, kind, tmp_path, services)


# -- the convention itself ----------------------------------------------------------------------


def test_every_python_block_of_every_page_is_run_or_skipped_with_a_reason() -> None:
    for path, page in PARSED.items():
        fences = sum(1 for line in (ROOT / path).read_text(encoding="utf-8").splitlines()
                     if FENCE.match(line) and FENCE.match(line)["info"] == "python")
        steps = [step for step in page.steps if step.kind in ("python", "skip")]
        assert len(steps) == fences, path
        assert all(step.text.strip() for step in steps if step.kind == "skip"), path
    assert sum(len(page.steps) for page in PARSED.values()) >= 20  # the pages were found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- snippet: skip -->\n```python\nx = 1\n```", "needs its reason"),
        ("<!-- snippet: skip why -->\nprose\n```python\nx = 1\n```", "not above a block"),
        ("<!-- snippet: skip why -->\n```sh\nls\n```", "skip marker above a sh block"),
        ("<!-- snippet: env -->\n```python\nx = 1\n```", "env marker above a python block"),
        ("<!-- snippet: setup x = 1 -->", "unknown snippet marker 'setup'"),
        ("<!-- snippet: paths var/lib -->", "absolute paths"),
        ("<!-- snippet: run\nx = 1\n", "without -->"),
        ("```python\nx = 1\n", "without a closing"),
    ],
)
def test_a_misplaced_or_incomplete_marker_fails_the_page(text: str, message: str) -> None:
    with pytest.raises(MarkupError, match=message):
        parse_text("page.md", text)


def test_markers_become_steps_with_the_lines_of_the_page() -> None:
    page = parse_text("page.md", "\n".join([
        "<!-- snippet: paths /srv/data -->",
        "<!-- snippet: run",
        "x = 1",
        "-->",
        "<!-- snippet: env -->",
        "```sh",
        "export A='a b'  # a comment",
        "unset B C",
        "```",
        "<!-- snippet: skip needs a GPU -->",
        "```python",
        "train()",
        "```",
        "```python title=example.py",
        "print(x)  # 1",
        "```",
    ]))

    assert [(step.kind, step.line, step.text) for step in page.steps] == [
        ("run", 3, "x = 1"),
        ("env", 7, "export A='a b'  # a comment\nunset B C"),
        ("skip", 12, "needs a GPU"),
        ("python", 15, "print(x)  # 1"),
    ]
    assert page.paths == ["/srv/data"]
    assert env_changes(page.steps[1], page) == [("A", "a b"), ("B", None), ("C", None)]


def test_an_env_block_takes_only_export_and_unset_lines() -> None:
    page = parse_text("page.md", "<!-- snippet: env -->\n```sh\nmake install\n```")
    with pytest.raises(MarkupError, match=r"page\.md:3: not an export or unset line"):
        env_changes(page.steps[0], page)


def test_absolute_paths_stay_in_the_scratch_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    page = parse_text("page.md", "<!-- snippet: paths /var/lib/ckpt -->")
    step = Step("python", 1, "")
    monkeypatch.chdir(tmp_path)

    check_paths(step, page, ["/var/lib/ckpt", "file:///var/lib/ckpt/sub", "./rel", "/"])
    with pytest.raises(MarkupError, match="'/etc/passwd' outside the scratch directory"):
        check_paths(step, page, string_constants('open("/etc/passwd")'))
    moved_url = moved('FileStore("file:///var/lib/ckpt")', page)
    assert moved_url == f'FileStore("file://{tmp_path}/var/lib/ckpt")'


def test_a_print_comment_is_checked_against_the_output() -> None:
    page, step = Page("page.md"), Step("python", 10, 'x = 1\nprint(x, "a")  # 1 a')

    check_print_claims(step, "1 a\n", page)
    with pytest.raises(AssertionError, match=r"page\.md:11: the comment says this prints '1 a'"):
        check_print_claims(step, "2 a\n", page)


@pytest.mark.parametrize("path", PAGES)
def test_a_page_cites_no_specification_outside_the_repository(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    cited = [line for line in text.splitlines() if "§" in line or re.search(r"\bSPEC\b", line)]
    assert not cited, f"{path} cites a specification readers cannot see: {cited}"
