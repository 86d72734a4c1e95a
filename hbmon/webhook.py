"""``POST /api/v1/alerts``: Alertmanager's webhook (version 4), feeding the failover guard.

401 without a bearer token, 403 with a wrong one (compared in constant time), 400 with a
clear message for a body that is not an Alertmanager notification, 413 for a body over
1 MiB (aiohttp's limit).  With client certificates configured (``tls_client_ca_file``)
every connection has already presented a verified certificate in the TLS handshake; the
bearer token is then still required when ``[webhook] token_file`` is set, and the
certificate alone is the credential when it is not.
Each firing ``HbmonHostDown`` or ``HbmonSiteIsolated`` alert with a ``pair`` label goes
to the guard, which decides on its own table (and, with an arbiter, waits for it in the
background: the answer comes at once); resolved and other alerts are acknowledged and
ignored, so repeated and resolved notifications are idempotent.
``GET /api/v1/failover/{pair}`` answers what an alert would cause now (a dry run).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

import anyio.abc
from aiohttp import web

from hbmon.arbiter.keeper import Keeper
from hbmon.errors import ArbiterError
from hbmon.failover import FailoverGuard
from hbmon.tls import peer_certificate

log = logging.getLogger(__name__)

#: The alerts that ask for a failover: every path of the pair is stale (with an arbiter,
#: HbmonSiteIsolated while the owner's lease is alive: the guard waits for it to expire).
ALERT_NAMES = frozenset({"HbmonHostDown", "HbmonSiteIsolated"})
MAX_BODY = 1 << 20


class BadNotification(ValueError):
    pass


def parse_notification(body: bytes) -> list[dict[str, Any]]:
    """The alerts of an Alertmanager v4 notification; raises :class:`BadNotification`."""
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise BadNotification(f"body is not JSON: {err}") from None
    except RecursionError:  # "[[[[..." a million deep fits in the 1 MiB body limit
        raise BadNotification("body is not an Alertmanager notification: nested too deep") from None
    if not isinstance(doc, dict):
        raise BadNotification("body must be a JSON object (an Alertmanager notification)")
    if doc.get("version") != "4":
        raise BadNotification(f'version is {doc.get("version")!r}; this webhook speaks "4"')
    alerts = doc.get("alerts")
    if not isinstance(alerts, list):
        raise BadNotification("'alerts' must be a list")
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise BadNotification(f"alerts[{i}] must be an object with a 'labels' object")
        if alert.get("status") not in ("firing", "resolved"):
            raise BadNotification(
                f"alerts[{i}].status is {alert.get('status')!r}, not firing or resolved"
            )
    return alerts


class Webhook:
    """The HTTP side of failover; the guard does the deciding."""

    def __init__(
        self,
        guard: FailoverGuard | None,
        token: bytes | None,
        task_group: Callable[[], anyio.abc.TaskGroup],
        *,
        client_certs: bool = False,
        keeper: Keeper | None = None,
    ) -> None:
        self.guard = guard
        self.keeper = keeper
        self.token = token
        self.task_group = task_group
        self.client_certs = client_certs

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/v1/alerts", self.alerts),
            web.get("/api/v1/failover/{pair}", self.dry_run),
            web.post("/api/v1/arbiter/handover/{pair}", self.handover),
        ]

    async def handover(self, request: web.Request) -> web.Response:
        """``hbmon arbiter handover PAIR --to SITE``: at the owner, demote (journaled) and
        move the pair to SITE with a new term; SITE runs its failover command."""
        keeper = self.keeper
        if keeper is None or (self.token is None and not self.client_certs):
            return _error(503, "handover needs [arbiter] and the webhook's credential")
        refused = self.refuse(request)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, 'body must be JSON: {"to": SITE}')
        site = body.get("to") if isinstance(body, dict) else None
        if not isinstance(site, str) or not site:
            return _error(400, 'body must name the site: {"to": SITE}')
        pair = request.match_info["pair"]
        try:
            term = await keeper.hand_over(pair, site)
        except ArbiterError as err:
            return _error(409, f"{pair} not handed over: {err}")
        return web.json_response({"pair": pair, "site": site, "term": term})

    async def alerts(self, request: web.Request) -> web.Response:
        if self.guard is None or (self.token is None and not self.client_certs):
            return _error(
                503, "webhook not configured: set [webhook] token_file (or tls_client_ca_file)"
            )
        refused = self.refuse(request)
        if refused is not None:
            return refused
        if (request.content_length or 0) > MAX_BODY:
            return _error(413, f"body over {MAX_BODY} bytes")
        try:
            alerts = parse_notification(await request.read())
        except BadNotification as err:
            return _error(400, str(err))
        except RecursionError:  # json.loads of "[[[[..." nested deeper than the stack
            return _error(400, "body is not an Alertmanager notification: nested too deeply")
        decisions = []
        for alert in alerts:
            labels = alert["labels"]
            name, pair = labels.get("alertname"), labels.get("pair")
            if name not in ALERT_NAMES or alert["status"] != "firing":
                decisions.append({"alert": name, "pair": pair, "action": "ignored"})
                continue
            if not isinstance(pair, str) or not pair:
                decisions.append({"alert": name, "action": "ignored", "reason": "no pair label"})
                continue
            decision = await self.guard.on_alert(pair, self.task_group())
            decisions.append({"alert": name, **decision.as_dict()})
        return web.json_response({"decisions": decisions})

    def refuse(self, request: web.Request) -> web.Response | None:
        """The answer to a request that lacks the webhook's credential, else None."""
        if self.token is None:  # client certificates only
            if peer_certificate(request.transport) is None:
                return _error(401, "client certificate required")
            return None
        auth = request.headers.get("Authorization", "")
        if not auth:
            return _error(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
        scheme, _, given = auth.partition(" ")
        # Header bytes that are not UTF-8 arrive as surrogates: compare them as the bytes
        # they were, so any header is merely wrong, never an error.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, self.token):
            return _error(403, "wrong bearer token")
        return None

    async def dry_run(self, request: web.Request) -> web.Response:
        if self.guard is None:
            return _error(503, "failover is not configured on this site ([webhook] token_file)")
        decision = self.guard.decide(request.match_info["pair"])
        return web.json_response({"dry_run": True, **decision.as_dict()})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
