"""Images for the vision model. `image_url` is either an object in the private attachments bucket
(`storage://chat-attachments/<user id>/<file>`), which becomes a short-lived signed URL, or an
https URL on a public host. Anything else is refused with a clear reason before any model call:
another scheme, a host that resolves to a private, loopback or link-local address (the worker
would be the one reaching into its own network), an object outside the user's folder, a missing
object or one over IMAGE_MAX_BYTES.

The HEAD request that checks an https image connects to the address that was checked, not to
whatever the host name resolves to a moment later (DNS rebinding): the URL carries the address,
the Host header and the TLS server name (SNI, and so the certificate check) the host name."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from worker.config import Settings
from worker.provider import ProviderError
from worker.store import RunStore

BUCKET = "chat-attachments"
Resolver = Callable[[str, int], Awaitable[list[str]]]
Signer = Callable[[str, str, int], Awaitable[str]]


class ImageRefused(ProviderError):
    def __init__(self, reason: str) -> None:
        super().__init__("invalid_image", reason, retryable=False)


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4_is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An IPv6 address that carries an IPv4 one (mapped, compatible, 6to4, Teredo, NAT64) is
    only as global as that IPv4 address: ::ffff:10.0.0.1 or 64:ff9b::a00:1 reach 10.0.0.1."""
    if ip.version == 4:
        return True
    assert isinstance(ip, ipaddress.IPv6Address)
    inner: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped:
        inner.append(ip.ipv4_mapped)
    if ip.sixtofour:
        inner.append(ip.sixtofour)
    if ip.teredo:
        inner.extend(ip.teredo)
    if int(ip) >> 32 == 0 or ip in NAT64:  # IPv4-compatible (::a.b.c.d), or NAT64 (64:ff9b::a.b.c.d)
        inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return all(address.is_global for address in inner)


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's own TLS context, built once (a client per check would read the CA bundle from disk
    each time, on the event loop): certifi's bundle, or the one SSL_CERT_FILE / SSL_CERT_DIR
    names, as OpenSSL's default for the worker's aiohttp and websocket clients honours them."""
    return httpx.create_ssl_context(trust_env=True)


async def head_pinned(url: str, addresses: list[str], *, verify: ssl.SSLContext | None = None,
                      timeout: float = 5.0) -> httpx.Response:
    """HEAD `url` on the first of `addresses` that takes the connection: it goes to that address,
    while the Host header, the TLS server name and the certificate check use the URL's host name.
    A client of its own, not reading proxy settings: pooled connections are keyed by address (one
    made for another host name must not be reused for this one), and a proxy would resolve the
    name again (see `ImageResolver.model_url`)."""
    target = httpx.URL(url)
    host = target.raw_host.decode("ascii")  # IDNA for a non-ASCII name, as TLS wants it
    async with httpx.AsyncClient(verify=verify or _tls(), timeout=timeout, trust_env=False) as http:
        for index, address in enumerate(addresses):
            try:
                return await http.head(target.copy_with(host=address), follow_redirects=False,
                                       headers={"Host": target.netloc.decode("ascii")},
                                       extensions={"sni_hostname": host})
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if index == len(addresses) - 1:
                    raise
    raise httpx.ConnectError(f"no address to connect to for {host}")


class ImageResolver:
    def __init__(self, settings: Settings, store: RunStore, *,
                 signer: Signer | None = None, resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.store = store
        self.signer = signer
        self.resolver = resolver

    def _too_big(self, size: int) -> ImageRefused:
        limit_mb = self.settings.image_max_bytes / (1024 * 1024)
        return ImageRefused(f"the image is {size / (1024 * 1024):.1f} MB; the limit is {limit_mb:g} MB")

    async def model_url(self, image_url: str, user_id: uuid.UUID) -> str:
        """The URL the model may fetch, or ImageRefused."""
        if image_url.startswith("storage://"):
            return await self._storage_url(image_url[len("storage://"):], user_id)
        parts = urlsplit(image_url)
        if parts.scheme != "https":
            raise ImageRefused("only https:// URLs and storage:// attachments can be used as images")
        host = parts.hostname
        if not host:
            raise ImageRefused("the image URL has no host")
        try:
            addresses = await (self.resolver or resolve_host)(host, parts.port or 443)
        except OSError:
            raise ImageRefused(f"the image host {host} cannot be resolved") from None
        checked = []
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global or not embedded_ipv4_is_global(ip):
                raise ImageRefused(f"the image URL points to a private or local address ({ip})")
            checked.append(str(ip))
        if not checked:
            raise ImageRefused(f"the image host {host} cannot be resolved")
        try:
            proxy = urllib.request.getproxies().get("https")
            if proxy and not urllib.request.proxy_bypass(host):
                # The operator sends the worker's https traffic through a proxy: it connects,
                # after resolving the name itself (so it must refuse private destinations). The
                # addresses were checked all the same. That proxy and no other setting: what
                # decided to use it decides alone.
                async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=5.0) as http:
                    response = await http.head(image_url, follow_redirects=False)
            else:
                response = await head_pinned(image_url, checked)
        except httpx.HTTPError as exc:
            raise ImageRefused(f"the image could not be fetched ({type(exc).__name__})") from None
        if response.status_code >= 400:
            raise ImageRefused(f"the image could not be fetched (HTTP {response.status_code})")
        if response.is_redirect:
            raise ImageRefused("the image URL redirects; use the final address")
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.image_max_bytes:
            raise self._too_big(int(length))
        kind = response.headers.get("content-type", "")
        if kind and not kind.startswith("image/"):
            raise ImageRefused(f"the URL is not an image ({kind.split(';')[0]})")
        return image_url

    async def _storage_url(self, location: str, user_id: uuid.UUID) -> str:
        bucket, _, path = location.partition("/")
        if bucket != BUCKET:
            raise ImageRefused(f"images must be in the {BUCKET} bucket")
        segments = path.split("/")
        if len(segments) < 2 or segments[0] != str(user_id) or any(s in ("", ".", "..") for s in segments):
            raise ImageRefused("the image must be in your own folder of the attachments bucket")
        info = await self.store.call("attachment_object", {"p_bucket": bucket, "p_path": path})
        if not info:
            raise ImageRefused("the attached image was not found in storage")
        size = int((info.get("metadata") or {}).get("size") or 0)
        if size > self.settings.image_max_bytes:
            raise self._too_big(size)
        if self.signer is None:
            raise ImageRefused("storage:// images need SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY to be signed")
        return await self.signer(bucket, path, self.settings.image_signed_url_seconds)


def supabase_signer(client: object) -> Signer:
    """Signs through Supabase Storage (`POST /storage/v1/object/sign/<bucket>/<path>`)."""

    async def sign(bucket: str, path: str, expires_in: int) -> str:
        response = await client.storage.from_(bucket).create_signed_url(path, expires_in)  # type: ignore[attr-defined]
        url = response.get("signedURL") or response.get("signedUrl")
        if not url:
            raise ImageRefused("Supabase Storage did not sign the image")
        return str(url)

    return sign
