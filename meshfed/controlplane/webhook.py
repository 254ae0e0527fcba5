"""The sidecar injector as a mutating admission webhook: ``POST /inject`` over HTTPS, AdmissionReview
``admission.k8s.io/v1`` in and out (see docs/injection.md).

:func:`review` is pure: the request body in, the HTTP status and the JSON answer out. A well-formed review of a
Pod gets ``allowed: true`` with a base64 ``JSONPatch`` (none when the pod is opted out or already injected), or
``allowed: false`` with the injector's message naming the field. A review that is well-formed but not of a
``v1`` Pod is refused the same way. A body that is not an AdmissionReview v1 (not JSON, another apiVersion, no
``request.uid``, no ``request.object``) is answered ``400`` with a message naming what is wrong: the API server
then reports the call failed, and ``failurePolicy: Fail`` keeps the pod out. Nothing here raises past
:func:`review`: an unexpected error in the injector is a denial naming it, never a 500.

:func:`serve_webhook` is the edge: an aiohttp HTTPS site on the given ``ssl.SSLContext`` (its certificate issued by
the cluster's intermediate for the webhook Service's names, renewed in place by
:class:`meshfed.controlplane.trust.TrustRenewal`).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from meshfed.controlplane.config import Listen
from meshfed.inject import InjectConfig, Injected, InjectError, inject

log = logging.getLogger("meshfed.webhook")

API_VERSION = "admission.k8s.io/v1"
PATH = "/inject"
MAX_BODY = 8 * 1024 * 1024
"""Bigger than any object the API server stores (etcd's default request limit is 1.5 MiB)."""


class ReviewError(ValueError):
    """The body is not an AdmissionReview v1 this webhook can answer; the message names the field."""


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReviewError(f"{field}: expected an object, got {type(value).__name__}")
    return value


def _answer(uid: str, **response: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, **response}}


def _deny(uid: str, message: str, *, code: int = 403) -> dict[str, Any]:
    return _answer(uid, allowed=False, status={"code": code, "message": message,
                                               "reason": "Forbidden" if code == 403 else "BadRequest"})


def review(body: bytes, config: InjectConfig) -> tuple[int, dict[str, Any]]:
    """Answer one AdmissionReview request body: ``(HTTP status, JSON)``."""
    try:
        uid, request = _parse(body)
    except ReviewError as exc:
        return 400, {"error": f"not an AdmissionReview {API_VERSION}: {exc}"}
    kind = _object(request.get("kind") or {}, "request.kind")
    gvk = (kind.get("group", ""), kind.get("version"), kind.get("kind"))
    if gvk != ("", "v1", "Pod"):
        group, version, name = gvk
        shown = f"{group}/{version} {name}" if group else f"{version} {name}"
        return 200, _deny(uid, f"meshfed's sidecar injector handles v1 Pods only, not {shown} (check the "
                               "MutatingWebhookConfiguration's rules)", code=400)
    operation = request.get("operation")
    if operation != "CREATE":
        return 200, _answer(uid, allowed=True)
    where = f"pod {request.get('namespace') or '?'}/{_pod_name(request)}"
    try:
        outcome = inject(request["object"], config)
    except InjectError as exc:
        log.info("injection denied %s: %s", where, exc)
        return 200, _deny(uid, f"meshfed sidecar injection: {exc}")
    except Exception as exc:  # the injector's own bug must still give the API server an answer, not a 500
        log.exception("injector failed %s", where)
        return 200, _deny(uid, f"meshfed sidecar injection failed: {type(exc).__name__}: {exc}", code=500)
    if not isinstance(outcome, Injected):
        log.debug("not injected %s: %s", where, outcome.reason)
        return 200, _answer(uid, allowed=True)
    patch = base64.b64encode(json.dumps(list(outcome.patch), separators=(",", ":")).encode()).decode()
    log.info("injected %s", where)
    return 200, _answer(uid, allowed=True, patchType="JSONPatch", patch=patch)


def _pod_name(request: dict[str, Any]) -> str:
    obj = request.get("object")
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(meta, dict):
        return str(meta.get("name") or meta.get("generateName") or request.get("name") or "?")
    return str(request.get("name") or "?")


def _parse(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReviewError(f"the body is not JSON ({exc})") from exc
    doc = _object(doc, "the body")
    if doc.get("apiVersion") != API_VERSION:
        raise ReviewError(f"apiVersion: expected {API_VERSION!r}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != "AdmissionReview":
        raise ReviewError(f"kind: expected 'AdmissionReview', got {doc.get('kind')!r}")
    request = _object(doc.get("request"), "request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid: missing or not a string")
    _object(request.get("kind"), "request.kind")
    if request.get("operation") == "CREATE":
        _object(request.get("object"), "request.object")
    return uid, request


async def serve_webhook(stack: AsyncExitStack, listen: Listen, ssl_context: ssl.SSLContext,
                        config: InjectConfig) -> int:
    """Serve ``POST /inject`` over HTTPS on ``listen`` until ``stack`` closes; returns the port bound."""

    async def handle(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"the body is larger than {MAX_BODY} bytes"}, status=413)
        status, answer = review(body, config)
        return web.json_response(answer, status=status)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ssl_context)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else listen.port
