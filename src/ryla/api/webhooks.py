"""Webhooks: one POST of the finished job (GET /jobs/{id}'s body) to the URL a request named,
retried on failure. Targets on loopback, private, link-local or otherwise non-public addresses
are refused unless the server allows them (`--allow-private-webhooks`), so a client cannot make
the server probe its own network; the check runs when the request arrives and again before
each delivery (the name may resolve elsewhere by then)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import httpx

from ryla.api.errors import ApiError

log = logging.getLogger(__name__)

ATTEMPTS = 4
FIRST_BACKOFF_S = 1.0
TIMEOUT_S = 10.0


class WebhookRefused(ValueError):
    pass


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_target(url: str, allow_private: bool) -> None:
    """WebhookRefused when `url` is not an http(s) URL or resolves to a non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise WebhookRefused("webhook URL must not carry credentials")
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"webhook host {parts.hostname!r} does not resolve ({exc})")
    addresses = {info[4][0] for info in infos}
    private = sorted(a for a in addresses if not _public(a))
    if private:
        raise WebhookRefused(f"webhook host {parts.hostname!r} resolves to a non-public address ({private[0]}); "
                             "the server refuses those unless started with --allow-private-webhooks")


async def validate_webhook(url: str | None, allow_private: bool) -> str | None:
    """The request's webhook, checked (422 naming the field when refused)."""
    if url is None:
        return None
    try:
        await check_target(url, allow_private)
    except WebhookRefused as exc:
        raise ApiError(422, "invalid_webhook", f"webhook: {exc}",
                       {"errors": [{"field": "webhook", "message": str(exc)}]})
    return url


async def deliver(job, settings) -> bool:
    """POST the job's final state; up to ATTEMPTS tries with doubling waits. True on a 2xx."""
    body = job.public()
    body["request_id"] = job.request_id
    delay = FIRST_BACKOFF_S
    for attempt in range(1, ATTEMPTS + 1):
        try:
            await check_target(job.webhook, settings.allow_private_webhooks)
            async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as client:
                response = await client.post(job.webhook, json=body,
                                             headers={"User-Agent": "ryla-webhook", "X-Ryla-Job-Id": job.id})
            if response.is_success:
                log.info("[%s] webhook delivered (attempt %d)", job.request_id, attempt)
                return True
            reason = f"HTTP {response.status_code}"
        except WebhookRefused as exc:
            log.warning("[%s] webhook refused: %s", job.request_id, exc)
            return False
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
        log.warning("[%s] webhook attempt %d failed (%s)", job.request_id, attempt, reason)
        if attempt < ATTEMPTS:
            await asyncio.sleep(delay)
            delay *= 2
    return False
