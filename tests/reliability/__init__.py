"""The reliability suite: acknowledged checkpoints survive faults, kills and tampering.

Sizes are bounded for CI; ``FC_RELIABILITY_SCALE=10`` multiplies them for a soak,
``FC_RELIABILITY_SEED`` replays a run, ``FC_RELIABILITY_REPORT=FILE`` appends the measured
figures as JSON lines. See docs/reliability.md.
"""
