"""Fetch an image from a URL a user pasted, without becoming a way into the network.

Anyone in the workspace can make the bot fetch a URL, so each hop is checked:
- only http and https;
- the host is resolved here and *every* address must be public: loopback, private,
  link-local (169.254.x.x: cloud metadata), multicast, reserved, shared (CGNAT) and
  unspecified addresses are refused (loopback only when ALLOW_LOOPBACK_URLS, for tests);
- the connection goes to the address that was checked (the URL is rewritten to the IP,
  with the original `Host` header and TLS server name), so DNS cannot answer
  differently a moment later (DNS rebinding);
- redirects are followed by hand, at most 3, and each target goes through the same
  checks;
- the answer must be 200 with an image content type, and it is read up to a byte cap,
  all within a time cap.

The client must not use proxies from the environment (`trust_env=False`) and must not
follow redirects by itself; `startup.py` makes it so. No token ever goes with these
requests.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

import anyio
import httpx2

from bot.downloads import read_capped
from bot.file_problem import FileProblem

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp"})
USER_AGENT = "slackbot-image-fetch/1"


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    content_type: str
    url: str  # after redirects


def address_allowed(address: str, *, allow_loopback: bool = False) -> bool:
    """True only for a globally routable unicast address (or loopback, when allowed)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    if ip.is_multicast or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_unspecified:
        return False
    return ip.is_global


async def _resolve(host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FileProblem(f"could not be fetched: the host {host!r} was not found", "dns") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _checked_addresses(url: httpx2.URL, allow_loopback: bool) -> list[str]:
    if url.scheme not in ("http", "https"):
        raise FileProblem("was not fetched: only http and https links are followed", "bad_scheme")
    if not url.host:
        raise FileProblem("was not fetched: the link has no host", "bad_url")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await _resolve(url.host, port)
    refused = [a for a in addresses if not address_allowed(a, allow_loopback=allow_loopback)]
    if refused or not addresses:
        log.warning("refused image URL host %s: resolves to non-public address(es) %s", url.host, refused)
        raise FileProblem("was not fetched: it points to a private or local network address", "private_address")
    return addresses


def _pinned_request(client: httpx2.AsyncClient, url: httpx2.URL, address: str) -> httpx2.Request:
    """A GET to `address` carrying `url`'s Host header and TLS server name."""
    host_header = url.netloc.decode("ascii")
    pinned = url.copy_with(host=address)
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return client.build_request(
        "GET",
        pinned,
        headers={"Host": host_header, "User-Agent": USER_AGENT, "Accept": "image/*"},
        extensions=extensions,
    )


async def _connect(client: httpx2.AsyncClient, url: httpx2.URL, addresses: list[str]) -> httpx2.Response:
    """GET `url` from the first of its (checked) addresses that accepts a connection."""
    for address in addresses[:-1]:
        try:
            return await client.send(_pinned_request(client, url, address), stream=True, follow_redirects=False)
        except httpx2.ConnectError:
            continue
    return await client.send(_pinned_request(client, url, addresses[-1]), stream=True, follow_redirects=False)


async def fetch_image(
    client: httpx2.AsyncClient, url: str, *, max_bytes: int, timeout: float, allow_loopback: bool = False
) -> FetchedImage:
    """The image at `url`. Raises FileProblem (refused, not an image, too big, too slow,
    unreachable)."""
    try:
        current = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError, ValueError):
        raise FileProblem("was not fetched: it is not a valid link", "bad_url") from None
    try:
        with anyio.fail_after(timeout):
            for _hop in range(MAX_REDIRECTS + 1):
                response = await _connect(client, current, await _checked_addresses(current, allow_loopback))
                try:
                    if response.status_code in REDIRECTS:
                        location = response.headers.get("location", "")
                        if not location:
                            raise FileProblem("could not be fetched: a redirect without a target", "bad_redirect")
                        current = current.join(location)
                        continue
                    if response.status_code != 200:
                        raise FileProblem(
                            f"could not be fetched (the server answered HTTP {response.status_code})", "http_status"
                        )
                    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                    if content_type not in IMAGE_TYPES:
                        raise FileProblem(
                            f"is not a PNG, JPEG, GIF or WebP image (the server says {content_type or 'nothing'})",
                            "not_an_image",
                        )
                    data = await read_capped(response, max_bytes)
                    return FetchedImage(data, content_type, str(current))
                finally:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
            raise FileProblem("could not be fetched: too many redirects", "bad_redirect")
    except TimeoutError:
        raise FileProblem(f"could not be fetched within {timeout:g} seconds", "timeout") from None
    except httpx2.HTTPError as exc:
        log.info("image URL fetch failed: %s", type(exc).__name__)
        raise FileProblem("could not be fetched (the server could not be reached)", "unreachable") from None
