"""Lifecycle rule ids when several stores share one bucket under prefixes of their own (S3
stores, DynamoDB stores' payloads): each store keeps its rules, and rules set under the fixed
ids of earlier versions are taken over by their own store only."""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores._dynamodb_provision import LIFECYCLE_RULE, provision_blob_bucket
from fastcheckpoint.stores._s3_provision import rule_id
from fastcheckpoint.stores.s3 import S3Store, lifecycle_rules
from tests.stores._moto import REGION, moto_endpoint, unique_name

__all__ = ["moto_endpoint"]

pytestmark = pytest.mark.anyio

DEADLINE = 60.0
NONCURRENT, BACKSTOP, BLOBS = (
    "fastcheckpoint-noncurrent", "fastcheckpoint-backstop", "fastcheckpoint-blobs")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _old(name: str, prefix: str, **actions: Any) -> dict[str, Any]:
    """A rule as an earlier version set it: the fixed id, filtered on the store's prefix."""
    return {"ID": name, "Status": "Enabled", "Filter": {"Prefix": prefix}, **actions}


async def _rules(store: S3Store, bucket: str) -> dict[str, dict[str, Any]]:
    """The bucket's lifecycle rules by id."""
    client = await store.client()
    found = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
    return {rule["ID"]: rule for rule in found["Rules"]}


def test_rule_ids_are_one_per_rule_and_prefix_readable_and_bounded() -> None:
    assert rule_id(NONCURRENT, "") == NONCURRENT  # the id of deployments before
    ids = {prefix: rule_id(NONCURRENT, prefix)
           for prefix in ("a/", "a", "a-", "a/b/", "a-b/", "é/", "x" * 384 + "/")}
    assert len(set(ids.values())) == len(ids)
    assert re.fullmatch(r"fastcheckpoint-noncurrent-a-b-[0-9a-f]{16}", ids["a/b/"])
    assert re.fullmatch(r"fastcheckpoint-noncurrent-[0-9a-f]{16}", ids["é/"])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,255}", ident) for ident in ids.values())
    assert rule_id(NONCURRENT, "a/") != rule_id(BACKSTOP, "a/")
    # The ids are how provisioning finds a store's rules again: they must never change.
    assert rule_id(NONCURRENT, "agents/") == "fastcheckpoint-noncurrent-agents-21025012cda7774e"


async def test_stores_under_other_prefixes_of_one_bucket_each_keep_their_rules(
    moto_endpoint: str,
) -> None:
    """Checkpoints under ``a/`` and ``b/``, payloads of DynamoDB stores under ``a/p/`` and
    ``b/p/``: once all provisioned, each provisioning again finds its rule, writing nothing."""
    name, endpoint = unique_name("ids"), moto_endpoint
    first, second = (S3Store(name, prefix, region=REGION, endpoint_url=endpoint)
                     for prefix in ("a", "b"))
    try:
        with anyio.fail_after(DEADLINE):
            await first.provision(backstop_days=30)
            await second.provision()
            client = await first.client()
            for prefix in ("a/p/", "b/p/"):
                await provision_blob_bucket(client, name, prefix)
            with RequestCounter.attached(client) as again:
                first_again = await first.provision(backstop_days=30)
                blobs_again = await provision_blob_bucket(client, name, "a/p/")
            rules = await _rules(first, name)
    finally:
        await first.aclose()
        await second.aclose()

    wanted = [*lifecycle_rules("a/", backstop_days=30), *lifecycle_rules("b/")]
    wanted += [{**LIFECYCLE_RULE, "ID": rule_id(BLOBS, prefix), "Filter": {"Prefix": prefix}}
               for prefix in ("a/p/", "b/p/")]
    assert sorted(rules) == sorted(rule["ID"] for rule in wanted)
    assert all(rules[rule["ID"]]["Filter"] == rule["Filter"] for rule in wanted)
    assert first_again[3:] == [f"found lifecycle rule {rule_id(NONCURRENT, 'a/')}",
                               f"found lifecycle rule {rule_id(BACKSTOP, 'a/')}"]
    assert blobs_again[3:] == [f"found lifecycle rule {rule_id(BLOBS, 'a/p/')}"]
    assert not any(operation.startswith("Put") for operation in again.counts)


async def test_a_rule_of_an_old_fixed_id_on_this_prefix_is_replaced_by_the_prefixs_id(
    moto_endpoint: str,
) -> None:
    """Rules an earlier version set for the stores under ``a/`` (checkpoints, with a backstop
    now no longer asked for) and ``a/p/`` (payloads) are replaced by their prefix's ids; what
    is left of the backstop rule goes too."""
    name, endpoint = unique_name("ids"), moto_endpoint
    store = S3Store(name, "a", region=REGION, endpoint_url=endpoint)
    old = [_old(NONCURRENT, "a/", NoncurrentVersionExpiration={"NoncurrentDays": 1}),
           _old(BACKSTOP, "a/", Expiration={"Days": 30}),
           _old(BLOBS, "a/p/", NoncurrentVersionExpiration={"NoncurrentDays": 30})]
    try:
        with anyio.fail_after(DEADLINE):
            await store.provision()
            client = await store.client()
            await client.put_bucket_lifecycle_configuration(
                Bucket=name, LifecycleConfiguration={"Rules": old})
            done = await store.provision()
            blobs = await provision_blob_bucket(client, name, "a/p/")
            rules = await _rules(store, name)
    finally:
        await store.aclose()

    assert done[3:] == [f"created lifecycle rule {rule_id(NONCURRENT, 'a/')}",
                        f"removed lifecycle rule {BACKSTOP}",
                        f"removed lifecycle rule {NONCURRENT}"]
    assert blobs[3:] == [f"created lifecycle rule {rule_id(BLOBS, 'a/p/')}",
                         f"removed lifecycle rule {BLOBS}"]
    assert sorted(rules) == sorted([rule_id(NONCURRENT, "a/"), rule_id(BLOBS, "a/p/")])


async def test_a_rule_of_an_old_fixed_id_on_another_prefix_stays_for_its_store(
    moto_endpoint: str,
) -> None:
    """The rules an earlier version set for the store under ``b/`` are left as they are by the
    store under ``a/`` (with or without a backstop), until the one under ``b/`` provisions."""
    name, endpoint = unique_name("ids"), moto_endpoint
    first, second = (S3Store(name, prefix, region=REGION, endpoint_url=endpoint)
                     for prefix in ("a", "b"))
    old = [_old(NONCURRENT, "b/", NoncurrentVersionExpiration={"NoncurrentDays": 1}),
           _old(BACKSTOP, "b/", Expiration={"Days": 30})]
    try:
        with anyio.fail_after(DEADLINE):
            client = await first.client()
            await first.provision()
            await client.put_bucket_lifecycle_configuration(
                Bucket=name, LifecycleConfiguration={"Rules": old})
            await first.provision()
            await first.provision(backstop_days=7)
            kept = await _rules(first, name)
            await second.provision(backstop_days=30)
            taken_over = await _rules(first, name)
    finally:
        await first.aclose()
        await second.aclose()

    assert (kept[NONCURRENT]["Filter"], kept[BACKSTOP]["Filter"]) == ({"Prefix": "b/"},) * 2
    assert kept[BACKSTOP]["Expiration"] == {"Days": 30}
    assert sorted(kept) == sorted([NONCURRENT, BACKSTOP, rule_id(NONCURRENT, "a/"),
                                   rule_id(BACKSTOP, "a/")])
    assert sorted(taken_over) == sorted(rule["ID"] for rule in [
        *lifecycle_rules("a/", backstop_days=7), *lifecycle_rules("b/", backstop_days=30)])
