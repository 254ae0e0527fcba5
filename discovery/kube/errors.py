"""Errors at the Kubernetes API edge: the client's exceptions (``ApiException``, urllib3's, ``OSError``) mapped
to this package's, once, here (:func:`api_error`, :func:`api_request`).

Exception tree (``DiscoveryError`` lives in ``discovery.model``)::

    DiscoveryError
     +-- KubeError                 anything at the Kubernetes API edge
          +-- KubeConfigError      kubeconfig missing or unreadable, or the context is not in it
          +-- KubeUnavailable      the API server could not be reached (refused, reset, timed out)
          +-- KubeApiError         the API server answered a failure Status (.status, .reason, .message)
               +-- KubeNotFound        404 NotFound
               +-- KubeAlreadyExists   409 AlreadyExists
               +-- KubeGone            410 Gone/Expired (reflectors handle it by relisting)
"""


from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TypeVar

import urllib3
from kubernetes import client as k8s_client

from discovery.model import DiscoveryError

log = logging.getLogger("meshfed.discovery.kube")
_T = TypeVar("_T")

# ------------------------------------------------------------------------------------------------------ errors


class KubeError(DiscoveryError):
    """Root of the errors at the Kubernetes API edge."""


class KubeConfigError(KubeError):
    """The kubeconfig is missing or unreadable, or it has no such context."""


class KubeUnavailable(KubeError):
    """The API server could not be reached."""


class KubeApiError(KubeError):
    """The API server answered with a failure ``Status``."""

    def __init__(self, status: int, reason: str, message: str, *, request: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.request = request
        where = f"{request}: " if request else ""
        super().__init__(f"{where}{status} {reason}: {message}")


class KubeNotFound(KubeApiError):
    """404: the object does not exist."""


class KubeAlreadyExists(KubeApiError):
    """409 AlreadyExists: the object exists already."""


class KubeGone(KubeApiError):
    """410: the resource version asked for is older than the server's history; relist."""


def api_error(exc: k8s_client.ApiException, *, request: str = "") -> KubeApiError:
    """Turn the client's ApiException into our typed error, reading the ``Status`` body when there is one."""
    status = int(exc.status or 0)
    reason = str(exc.reason or "")
    message = ""
    if exc.body:
        try:
            body = json.loads(exc.body)
        except (TypeError, ValueError):
            message = str(exc.body)[:200]
        else:
            if isinstance(body, dict):
                reason = str(body.get("reason") or reason)
                message = str(body.get("message") or "")
    if status == 404:
        return KubeNotFound(status, reason or "NotFound", message, request=request)
    if status == 409 and reason == "AlreadyExists":
        return KubeAlreadyExists(status, reason, message, request=request)
    if status == 410:
        return KubeGone(status, reason or "Gone", message, request=request)
    return KubeApiError(status, reason, message, request=request)


def api_request(request: str, call: Callable[[], _T]) -> _T:
    """Make one API request; its failures become this module's errors, named by ``request``."""
    try:
        return call()
    except k8s_client.ApiException as exc:
        raise api_error(exc, request=request) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeUnavailable(f"{request}: {describe_error(exc)}") from exc


def describe_error(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}"
