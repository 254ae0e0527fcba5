"""Schemathesis against the federation's own OpenAPI document, on a running ``meshfed federation serve`` (issue 10):
generated requests, valid and invalid, to every route, authenticated with a real cluster client certificate. Checks:
no 5xx, every status code documented, every response's content type and body matching the document.

Bounded for CI (a few dozen examples per operation). Left out: ``GET /v1/catalog/watch`` (a stream that does not
end by design; its errors are covered in tests/federation), and schemathesis's "positive data acceptance" check,
since the document cannot express every rule the service enforces (an endpoint address must be an IP, a port is
listed once, a locality may not name another cluster): a schema-valid body the service refuses with 400 naming the
field is correct behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import CHECKS

from federation.service.openapi import document
from tests.federation.fedkit import Pki, ServiceProcess

pytestmark = pytest.mark.timeout(600)


class _MtlsAdapter(HTTPAdapter):
    """requests over the project's own client TLS context (the cluster certificate, the trust bundle; the server is
    checked by its SPIFFE ID, not a DNS name, so urllib3 must not match a hostname)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        kwargs["assert_hostname"] = False
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, requests.Session]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    pki = Pki.create()
    service = ServiceProcess(pki, tmp, f"sqlite:{tmp / 'fed.db'}", lease_ttl=30.0)
    service.start()
    session = requests.Session()
    session.mount("https://", _MtlsAdapter(pki.client_ssl("east")))
    try:
        response = session.put(f"{service.url}/v1/clusters/east", json={"network": "net1"}, timeout=10)
        assert response.status_code == 200, response.text
        assert session.get(f"{service.url}/v1/openapi.json", timeout=10).json() == document()
        yield service, session
    finally:
        session.close()
        service.stop()


# The document the code serves, loaded when the module is (hypothesis needs the operations before any fixture
# runs); the fixture checks that the running service serves exactly this.
schema = schemathesis.openapi.from_dict(document()).exclude(path="/v1/catalog/watch")
EXCLUDED = [check for check in CHECKS.get_all() if check.__name__ == "positive_data_acceptance"]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_keeps_to_its_openapi_document(case: Any, federation: tuple[ServiceProcess,
                                                                                  requests.Session]) -> None:
    service, session = federation
    if "cluster" in (case.path_parameters or {}) and hash(repr(case.body)) % 4:
        case.path_parameters = {**case.path_parameters, "cluster": "east"}  # mostly our own cluster: past the 403
    case.call_and_validate(base_url=service.url, session=session, timeout=30, excluded_checks=EXCLUDED)


def test_the_service_survived(federation: tuple[ServiceProcess, requests.Session], tmp_path: Path) -> None:
    service, session = federation
    assert service.proc is not None and service.proc.alive(), service.output()[-2000:]
    assert session.get(f"{service.url}/readyz", timeout=10).status_code == 200
    assert "Traceback" not in service.output(), service.output()[-3000:]
