"""A moto server for the S3 and DynamoDB tests: one per test session, on 127.0.0.1.

moto's in-process ``mock_aws`` patches botocore's synchronous HTTP layer, which aiobotocore
does not use, so the tests talk to moto in server mode over real HTTP like to AWS. Import the
fixtures into a test module (``from tests.stores._moto import moto_endpoint  # noqa: F401``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fastcheckpoint.testing.moto import serialized_moto_server

REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


def unique_name(kind: str) -> str:
    """A bucket or table name no other test session uses (lowercase, S3-legal)."""
    return f"fc-test-{kind}-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<random port>`` of a moto server, with fake credentials in the env.

    Requests are served one at a time, so conditional writes are atomic as on AWS. The
    credentials keep any real AWS account out of reach: a test that forgot the endpoint fails
    to sign in rather than touching real resources.
    """
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = serialized_moto_server()
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def provision_table_alone(table: str, endpoint: str, session: Any) -> None:
    """Provision DynamoDB table ``table`` with a store without a bucket: a test's store on a
    bucket the session provisioned once would add its prefix's lifecycle rule to it, most of
    the cost of provisioning on moto."""
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    store = DynamoDBStore(table, region=REGION, endpoint_url=endpoint, session=session)
    try:
        with anyio.fail_after(30):
            await store.provision()
    finally:
        await store.aclose()
