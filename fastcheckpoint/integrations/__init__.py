"""Adapters that plug fastcheckpoint stores into agent frameworks.

Each integration lives in its own module and imports its framework only there, so
``import fastcheckpoint`` never needs one: ``fastcheckpoint.integrations.langgraph`` needs
``pip install 'fastcheckpoint[langgraph]'``.
"""
