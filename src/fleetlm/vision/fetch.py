"""Fetching a remote image without becoming a proxy into the network: https only; the host is resolved and
every address checked (loopback, private, link-local, multicast, reserved, unspecified and other non-global
addresses are refused, IPv6 forms and IPv4 addresses embedded in IPv6 included); the connection goes to the
checked address (so a second DNS answer cannot swap it), with the name kept for TLS; each redirect is checked
again; a byte limit and one timeout for all of it."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import httpx

from fleetlm.vision.errors import ImageFetchFailed, ImageTooLarge, ImageUrlRefused

MAX_REDIRECTS = 3

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (IPv4 and IPv6)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def refused_reason(address: str) -> str | None:
    """Why the gateway must not connect to this address, or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and (reason := refused_reason(str(embedded))):
            return reason
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):  # most telling
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared (100.64/10), documentation, benchmarking ... ranges
        return "non-global"
    return None


async def check_url(url: str, resolve: Resolver = resolve_host) -> tuple[httpx.URL, str]:
    """The parsed URL and the address to connect to; ImageUrlRefused unless https and public."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageUrlRefused(f"not a valid image URL: {exc}") from None
    if parsed.scheme != "https":
        raise ImageUrlRefused(f"only https image URLs are fetched, not {parsed.scheme or 'this'}://")
    host = parsed.host
    if not host:
        raise ImageUrlRefused("the image URL has no host")
    try:
        addresses = [host] if _is_address(host) else await resolve(host, parsed.port or 443)
    except (OSError, UnicodeError) as exc:
        raise ImageFetchFailed(f"could not resolve the image host {host}: {exc}") from None
    if not addresses:
        raise ImageFetchFailed(f"the image host {host} has no address")
    for address in addresses:
        if reason := refused_reason(address):
            raise ImageUrlRefused(f"the image host {host} resolves to {address}, a {reason} address: images "
                                  "are fetched only from public addresses")
    return parsed, addresses[0]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    resolve: Resolver = resolve_host,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """An https image URL's body: redirects followed (each checked), at most max_bytes, within timeout_s."""
    try:
        return await asyncio.wait_for(_follow(url, max_bytes, timeout_s, resolve, transport), timeout_s)
    except asyncio.TimeoutError:
        raise ImageFetchFailed(f"the image did not arrive within {timeout_s:g} s") from None


async def _follow(url: str, max_bytes: int, timeout_s: float, resolve: Resolver,
                  transport: httpx.AsyncBaseTransport | None) -> bytes:
    async with httpx.AsyncClient(transport=transport, timeout=timeout_s, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parsed, address = await check_url(url, resolve)
            host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
            request = client.build_request(
                "GET", parsed.copy_with(host=address),
                headers={"host": host_header, "accept": "image/*"},
                extensions={"sni_hostname": parsed.host},  # TLS checks the certificate against the name
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise ImageFetchFailed(f"could not fetch the image from {parsed.host}: "
                                       f"{type(exc).__name__}") from None
            try:
                if response.is_redirect:
                    url = str(parsed.join(response.headers.get("location", "")))
                    continue
                if response.status_code != 200:
                    raise ImageFetchFailed(f"{parsed.host} answered {response.status_code} for the image")
                return await _read_at_most(response, max_bytes)
            finally:
                await response.aclose()
    raise ImageFetchFailed(f"more than {MAX_REDIRECTS} redirects for the image")


async def _read_at_most(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"the image is {declared} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    try:
        async for chunk in response.aiter_bytes():  # decoded: a gzip bomb counts at its real size
            size += len(chunk)
            if size > max_bytes:
                raise ImageTooLarge(f"the image is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ImageFetchFailed(f"the image download broke off: {type(exc).__name__}") from None
    return b"".join(chunks)
