"""The test and benchmark moto server's DynamoDB transactions: all of their writes or none, as
moto's own, while copying only the items they name (moto copies whole tables, so its
transactions slowed with every item a table held)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.session import get_session

from tests.stores._moto import REGION, moto_endpoint, unique_name

__all__ = ["moto_endpoint"]

_ACCOUNT = "123456789012"  # moto's default account


@pytest.fixture
def client(moto_endpoint: str) -> Iterator[Any]:
    made = get_session().create_client("dynamodb", region_name=REGION,
                                       endpoint_url=moto_endpoint)
    try:
        yield made
    finally:
        made.close()


def _table(client: Any, *, stream: bool = False) -> str:
    name = unique_name("tx")
    extra: dict[str, Any] = {}
    if stream:
        extra["StreamSpecification"] = {"StreamEnabled": True,
                                        "StreamViewType": "NEW_AND_OLD_IMAGES"}
    client.create_table(
        TableName=name, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                   {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                              {"AttributeName": "sk", "AttributeType": "S"}], **extra)
    for sk, value in (("kept", "1"), ("updated", "1"), ("deleted", "1")):
        client.put_item(TableName=name, Item=_item(sk, value))
    return name


def _item(sk: str, value: str) -> dict[str, Any]:
    return {"pk": {"S": "p"}, "sk": {"S": sk}, "v": {"S": value}, "b": {"B": b"\x00\xff"}}


def _key(sk: str) -> dict[str, Any]:
    return {"pk": {"S": "p"}, "sk": {"S": sk}}


def _contents(client: Any, table: str) -> dict[str, str]:
    found = client.query(TableName=table, KeyConditionExpression="pk = :p",
                         ExpressionAttributeValues={":p": {"S": "p"}}, ConsistentRead=True)
    for item in found["Items"]:
        assert item["b"] == {"B": b"\x00\xff"}
    return {item["sk"]["S"]: item["v"]["S"] for item in found["Items"]}


def _writes(table: str, last: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"Put": {"TableName": table, "Item": _item("new", "1"),
                 "ConditionExpression": "attribute_not_exists(pk)"}},
        {"Update": {"TableName": table, "Key": _key("updated"),
                    "UpdateExpression": "SET v = :v", "ExpressionAttributeValues": {
                        ":v": {"S": "2"}}}},
        {"Delete": {"TableName": table, "Key": _key("deleted")}},
        last,
    ]


def _backend_table(name: str) -> Any:
    from moto.dynamodb.models import dynamodb_backends

    return dynamodb_backends[_ACCOUNT][REGION].tables[name]


def test_a_transaction_that_succeeds_makes_every_write(client: Any) -> None:
    table = _table(client)
    client.transact_write_items(TransactItems=_writes(table, {"ConditionCheck": {
        "TableName": table, "Key": _key("kept"), "ConditionExpression": "v = :one",
        "ExpressionAttributeValues": {":one": {"S": "1"}}}}))
    assert _contents(client, table) == {"kept": "1", "updated": "2", "new": "1"}


@pytest.mark.parametrize("failing", ["condition", "same item twice"])
def test_a_cancelled_transaction_makes_none_and_copies_no_table(
    client: Any, failing: str
) -> None:
    table = _table(client)
    before = _backend_table(table)
    last = ({"ConditionCheck": {"TableName": table, "Key": _key("kept"),
                                "ConditionExpression": "v = :two",
                                "ExpressionAttributeValues": {":two": {"S": "2"}}}}
            if failing == "condition"
            else {"Put": {"TableName": table, "Item": _item("new", "again")}})
    with pytest.raises(ClientError) as raised:
        client.transact_write_items(TransactItems=_writes(table, last))
    expected = ("TransactionCanceledException" if failing == "condition"
                else "ValidationException")
    assert raised.value.response["Error"]["Code"] == expected
    assert _contents(client, table) == {"kept": "1", "updated": "1", "deleted": "1"}
    # moto's own rollback would have put a copy of the table in its place
    assert _backend_table(table) is before


def test_a_table_with_a_stream_keeps_motos_own_rollback(client: Any) -> None:
    table = _table(client, stream=True)
    before = _backend_table(table)
    with pytest.raises(ClientError):
        client.transact_write_items(TransactItems=_writes(table, {"ConditionCheck": {
            "TableName": table, "Key": _key("kept"), "ConditionExpression": "v = :two",
            "ExpressionAttributeValues": {":two": {"S": "2"}}}}))
    assert _contents(client, table) == {"kept": "1", "updated": "1", "deleted": "1"}
    assert _backend_table(table) is not before
