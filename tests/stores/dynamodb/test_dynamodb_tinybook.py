"""The whole store contract on DynamoDB run items whose book details only 2 entries, so
that nearly every run of the contract reaches the book's back (counted, not detailed) and its
refills: the bounded book keeps every clause of the contract. Marked slow (a second pass of
the contract on moto, about a minute)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.testing import StoreContract
from tests.stores._moto import moto_endpoint, unique_name
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned"]

pytestmark = pytest.mark.slow


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


class TestDynamoDBStoreWithATinyBook(StoreContract):
    deadline_seconds = DEADLINE

    @pytest.fixture
    async def store(
        self, provisioned: str, aws_names: tuple[str, str]
    ) -> AsyncIterator[CheckpointStore]:
        async with opened(provisioned, (unique_name("tiny"), aws_names[1])) as store:
            store._book_capacity = 2
            with anyio.fail_after(30):
                await store.provision()
            yield store
