"""Store tests, one package per backend (``memory``, ``file``, ``sqlite``, ``redis``,
``postgres``, ``s3``, ``dynamodb``), each holding its contract run and its own tests.

This level keeps what several backends share: the fixtures (``conftest.py``, inherited by every
package below), the server helpers other suites import (``_moto``, ``_redis_servers``,
``_redis_support``, ``_postgres_server``, ``_capability_calls``), and the tests that span S3
and DynamoDB (``test_aws.py``: the AWS plumbing both stores use; ``test_shared_item_races.py``:
the same race on both, with the fixtures of each).
"""
