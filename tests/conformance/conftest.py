"""Fixtures of the conformance checks: east's CA (shared with tests/meshfed)."""

from tests.meshfed.conftest import east_ca

__all__ = ["east_ca"]
