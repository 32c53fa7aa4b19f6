"""Pasted image URLs: fetched over real sockets from a server on 127.0.0.1, on both
backends, with every refusal rule (scheme, private addresses also after a redirect,
content type, size, time)."""

from __future__ import annotations

import math

import anyio
import httpx2
import pytest

from bot.file_problem import FileProblem
from bot.url_fetch import address_allowed, fetch_image
from tests import media_samples as samples
from tests.fakes.servers import http_server

pytestmark = pytest.mark.anyio

PNG = samples.png_bytes((30, 20))


class Site:
    """A tiny web server's behaviour, keyed by path; records the requests it got."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/cat.png":
            return httpx2.Response(200, content=PNG, headers={"Content-Type": "image/png"})
        if path == "/hop.png":
            return httpx2.Response(302, headers={"Location": "/cat.png"})
        if path == "/to-private.png":
            return httpx2.Response(302, headers={"Location": "http://10.20.30.40/x.png"})
        if path == "/to-metadata.png":
            return httpx2.Response(301, headers={"Location": "http://169.254.169.254/latest/meta-data/x.png"})
        if path == "/loop.png":
            return httpx2.Response(302, headers={"Location": "/loop.png"})
        if path == "/page.png":
            return httpx2.Response(200, text="<html>login</html>", headers={"Content-Type": "text/html"})
        if path == "/big.png":
            return httpx2.Response(200, content=b"\0" * 3000, headers={"Content-Type": "image/png"})
        if path == "/chunked.png":

            async def body():
                for _ in range(10):
                    yield b"\0" * 1000

            return httpx2.Response(200, content=body(), headers={"Content-Type": "image/png"})
        if path == "/slow.png":
            await anyio.sleep(math.inf)
        return httpx2.Response(404, text="no")


@pytest.fixture
async def site():
    handler = Site()
    async with http_server(handler.handle) as origin:
        handler.origin = origin
        yield handler


async def fetch(client, url, **kwargs):
    options = {"max_bytes": 2000, "timeout": 3.0, "allow_loopback": True, **kwargs}
    return await fetch_image(client, url, **options)


@pytest.fixture
async def client():
    async with httpx2.AsyncClient(trust_env=False, follow_redirects=False) as c:
        yield c


async def refused(client, url, **kwargs) -> FileProblem:
    with pytest.raises(FileProblem) as caught:
        await fetch(client, url, **kwargs)
    return caught.value


async def test_image_is_fetched_with_its_host_header(site, client):
    got = await fetch(client, f"{site.origin}/cat.png")
    assert got.data == PNG and got.content_type == "image/png"
    assert site.requests[0].headers["host"] == site.origin.removeprefix("http://")
    assert "authorization" not in site.requests[0].headers


async def test_localhost_by_name_resolves_and_is_checked(site, client):
    port = site.origin.rsplit(":", 1)[1]
    got = await fetch(client, f"http://localhost:{port}/cat.png")
    assert got.data == PNG
    assert site.requests[0].headers["host"] == f"localhost:{port}"  # the name, though the IP was dialled
    assert (await refused(client, f"http://localhost:{port}/cat.png", allow_loopback=False)).kind == "private_address"


async def test_loopback_is_refused_unless_allowed(site, client):
    problem = await refused(client, f"{site.origin}/cat.png", allow_loopback=False)
    assert problem.kind == "private_address" and site.requests == []


async def test_redirects_are_followed_and_checked_at_every_hop(site, client):
    assert (await fetch(client, f"{site.origin}/hop.png")).data == PNG
    for path in ("/to-private.png", "/to-metadata.png"):
        assert (await refused(client, f"{site.origin}{path}")).kind == "private_address"
    assert (await refused(client, f"{site.origin}/loop.png")).kind == "bad_redirect"


@pytest.mark.parametrize(
    "url,kind",
    [
        ("ftp://example.com/x.png", "bad_scheme"),
        ("file:///etc/passwd.png", "bad_scheme"),
        ("http://10.0.0.1/x.png", "private_address"),
        ("http://192.168.1.1/x.png", "private_address"),
        ("http://[::1]/x.png", "private_address"),
        ("http://[fe80::1]/x.png", "private_address"),
        ("http://224.0.0.1/x.png", "private_address"),
        ("http://0.0.0.0/x.png", "private_address"),
        ("http://[::ffff:127.0.0.1]/x.png", "private_address"),
        ("http://no-such-host.invalid/x.png", "dns"),
    ],
)
async def test_refused_before_connecting(client, url, kind):
    assert (await refused(client, url, allow_loopback=False)).kind == kind


async def test_content_type_size_and_time_caps(site, client):
    assert (await refused(client, f"{site.origin}/page.png")).kind == "not_an_image"
    assert (await refused(client, f"{site.origin}/big.png")).kind == "too_large"  # Content-Length
    assert (await refused(client, f"{site.origin}/chunked.png")).kind == "too_large"  # counted while reading
    assert (await refused(client, f"{site.origin}/missing.png")).kind == "http_status"
    started = anyio.current_time()
    assert (await refused(client, f"{site.origin}/slow.png", timeout=0.3)).kind == "timeout"
    assert anyio.current_time() - started < 2


def test_address_rules():
    assert address_allowed("93.184.215.14") and address_allowed("2606:4700::1111")
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.251",
        "255.255.255.255",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "not an address",
    ):
        assert not address_allowed(address), address
    assert address_allowed("127.0.0.1", allow_loopback=True) and address_allowed("::1", allow_loopback=True)
    assert not address_allowed("10.1.2.3", allow_loopback=True)
