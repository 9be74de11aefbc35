"""Remote image fetching: address checks, the pinned address, redirects re-checked, byte limit, timeout."""

import asyncio

import httpx
import pytest

from fleetlm.vision.errors import ImageFetchFailed, ImageTooLarge, ImageUrlRefused
from fleetlm.vision.fetch import check_url, fetch_image, refused_reason

PUBLIC = "93.184.215.14"
DNS = {"img.example.com": [PUBLIC], "evil.example.com": ["10.0.0.5"],
       "mixed.example.com": [PUBLIC, "127.0.0.1"], "v6.example.com": ["2606:4700::6810:84e5"]}


async def fake_resolve(host, port):
    if host not in DNS:
        raise OSError(f"[Errno -2] Name or service not known: {host}")
    return DNS[host]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
    ("172.16.4.4", "private"), ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("240.0.0.1", "reserved"), ("fc00::1", "private"), ("100.64.0.1", "non-global"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
    ("8.8.8.8", None), ("2606:4700::6810:84e5", None),
])
def test_refused_reason(address, reason):
    assert refused_reason(address) == reason


def test_check_url_refuses_non_https_private_names_and_any_bad_address():
    for url in ("http://img.example.com/a.png", "https://evil.example.com/a.png",
                "https://mixed.example.com/a.png", "https://127.0.0.1/a.png", "https://[::1]/a.png"):
        with pytest.raises(ImageUrlRefused):
            run(check_url(url, fake_resolve))
    with pytest.raises(ImageFetchFailed, match="could not resolve"):
        run(check_url("https://nowhere.example.com/a.png", fake_resolve))
    assert run(check_url("https://img.example.com/a.png", fake_resolve))[1] == PUBLIC


def test_localhost_is_refused_with_the_real_resolver():
    with pytest.raises(ImageUrlRefused, match="loopback"):
        run(check_url("https://localhost/a.png"))


def serve(handler):
    return httpx.MockTransport(handler)


def fetch(url, handler, max_bytes=1000, timeout_s=5.0):
    return run(fetch_image(url, max_bytes=max_bytes, timeout_s=timeout_s, resolve=fake_resolve,
                           transport=serve(handler)))


def test_fetch_connects_to_the_checked_address_with_the_name_for_host_and_tls():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, content=b"PNGDATA")

    assert fetch("https://img.example.com/a.png?x=1", handler) == b"PNGDATA"
    (req,) = seen
    assert req.url.host == PUBLIC and req.url.path == "/a.png" and req.url.query == b"x=1"
    assert req.headers["host"] == "img.example.com"
    assert req.extensions["sni_hostname"] == "img.example.com"


def test_a_redirect_is_checked_again():
    def handler(request):
        if request.url.path == "/a.png":
            return httpx.Response(302, headers={"location": "https://evil.example.com/inside"})
        return httpx.Response(200, content=b"secret")

    with pytest.raises(ImageUrlRefused, match="10.0.0.5"):
        fetch("https://img.example.com/a.png", handler)


def test_a_redirect_to_a_public_host_is_followed_and_loops_stop():
    def handler(request):
        if request.url.path == "/a.png":
            return httpx.Response(301, headers={"location": "/b.png"})
        if request.url.path == "/b.png":
            return httpx.Response(200, content=b"B")
        return httpx.Response(302, headers={"location": "/loop"})

    assert fetch("https://img.example.com/a.png", handler) == b"B"
    with pytest.raises(ImageFetchFailed, match="redirects"):
        fetch("https://img.example.com/loop", handler)


def test_byte_limit_status_and_timeout():
    with pytest.raises(ImageTooLarge):
        fetch("https://img.example.com/a.png", lambda r: httpx.Response(200, content=b"x" * 2000))
    with pytest.raises(ImageTooLarge):  # no content-length: counted as it arrives

        async def endless():
            while True:
                yield b"x" * 100

        fetch("https://img.example.com/a.png", lambda r: httpx.Response(200, content=endless()))
    with pytest.raises(ImageFetchFailed, match="404"):
        fetch("https://img.example.com/a.png", lambda r: httpx.Response(404))
    with pytest.raises(ImageFetchFailed, match="ConnectError"):
        fetch("https://img.example.com/a.png", lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused")))

    async def slow(request):
        await asyncio.sleep(5)
        return httpx.Response(200, content=b"late")

    with pytest.raises(ImageFetchFailed, match="within 0.2 s"):
        fetch("https://img.example.com/a.png", slow, timeout_s=0.2)
