"""DynamoDB log lines quote the text agents give (a label) rather than writing it raw, so a
line break or an escape sequence in it cannot forge a log line or act on a terminal."""

from __future__ import annotations

import secrets
import unicodedata

import msgspec
import pytest

from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import T0, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import atomic_moto, aws_names, provisioned, store

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def test_a_malformed_label_entry_is_logged_with_its_label_quoted(
    store: DynamoDBStore, caplog: pytest.LogCaptureFixture
) -> None:
    label = f"thread-{secrets.token_hex(4)}\nERROR fastcheckpoint: forged\x1b[2J\u202e"
    run = msgspec.structs.replace(make_run(f"lg-{secrets.token_hex(4)}"), labels=(label,))
    await _append_items(store, run, 0)
    ddb, _ = await store.clients()
    found = await ddb.query(
        TableName=store.table, KeyConditionExpression="PK = :p",
        ExpressionAttributeValues={":p": {"S": layout.label_partition(label)}})
    [entry] = found["Items"]
    await ddb.update_item(TableName=store.table, Key={"PK": entry["PK"], "SK": entry["SK"]},
                          UpdateExpression="REMOVE rk")

    with caplog.at_level("WARNING", logger="fastcheckpoint.stores.dynamodb"):
        listed, _ = await store.runs_with_label(label, limit=10, cursor=None, now=T0)

    assert listed == []
    [line] = [r.getMessage() for r in caplog.records if "label entry" in r.getMessage()]
    assert [char for char in line
            if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")] == []
    assert "forged" in line
