"""Images: URL refusals before any model call, Storage objects signed for the vision model, and
the attachments bucket's policies acting as the Storage API does (role and JWT claims)."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import AsyncIterator

import httpx
import psycopg
import psycopg.errors
import pytest
import respx
import trustme
from aiohttp import web

from tests import postgrest
from tests.pipeline_helpers import finished_runs, new_user_thread, query, say, wait_until, worker_settings
from tests.conftest import user_message
from tests.postgrest import create_user, request
from tests.supabase_emulator import SupabaseEmulator
from tests.test_supabase_transport import start_worker, stop_worker, supabase_settings
from worker.attachments import ImageRefused, ImageResolver, _tls, head_pinned
from worker.config import Settings
from worker.store import PostgresStore

USER = uuid.UUID("11111111-2222-3333-4444-555555555555")


def resolver_for(addresses: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in addresses:
            raise OSError("no such host")
        return addresses[host]

    return resolve


@pytest.mark.parametrize(("url", "reason"), [
    ("http://images.example/a.png", "only https:// URLs and storage:// attachments"),
    ("ftp://images.example/a.png", "only https:// URLs and storage:// attachments"),
    ("data:image/png;base64,AAAA", "only https:// URLs and storage:// attachments"),
    ("javascript:alert(1)", "only https:// URLs and storage:// attachments"),
    ("https://127.0.0.1/a.png", "private or local address (127.0.0.1)"),
    ("https://10.1.2.3/a.png", "private or local address (10.1.2.3)"),
    ("https://192.168.0.10/a.png", "private or local address (192.168.0.10)"),
    ("https://169.254.169.254/latest/meta-data", "private or local address (169.254.169.254)"),
    ("https://[::1]/a.png", "private or local address (::1)"),
    ("https://[fd00::1]/a.png", "private or local address (fd00::1)"),
    # IPv6 addresses that carry a private IPv4 one: NAT64, 6to4, IPv4-compatible
    ("https://[64:ff9b::a00:1]/a.png", "private or local address (64:ff9b::a00:1)"),
    ("https://[2002:a00:1::]/a.png", "private or local address (2002:a00:1::)"),
    ("https://[::127.0.0.1]/a.png", "private or local address (::7f00:1)"),
    ("https://nat64.example/a.png", "private or local address (64:ff9b::a9fe:a9fe)"),
    ("https://internal.example/a.png", "private or local address (172.16.5.4)"),
    ("https://rebind.example/a.png", "private or local address (127.0.0.1)"),
    ("https://nowhere.example/a.png", "cannot be resolved"),
    ("https:///a.png", "has no host"),
])
async def test_image_urls_are_refused_before_any_request(url: str, reason: str) -> None:
    addresses = {"127.0.0.1": ["127.0.0.1"], "10.1.2.3": ["10.1.2.3"], "192.168.0.10": ["192.168.0.10"],
                 "169.254.169.254": ["169.254.169.254"], "::1": ["::1"], "fd00::1": ["fd00::1"],
                 "64:ff9b::a00:1": ["64:ff9b::a00:1"], "2002:a00:1::": ["2002:a00:1::"], "::127.0.0.1": ["::7f00:1"],
                 "nat64.example": ["64:ff9b::169.254.169.254"],
                 "internal.example": ["172.16.5.4"], "rebind.example": ["93.184.216.34", "127.0.0.1"]}
    with respx.mock(assert_all_called=False) as router:
        head = router.head(url__regex=".*").respond(200, headers={"content-type": "image/png"})
        images = ImageResolver(Settings(), None, resolver=resolver_for(addresses))  # type: ignore[arg-type]
        with pytest.raises(ImageRefused) as refusal:
            await images.model_url(url, USER)
    assert reason in refusal.value.message and refusal.value.code == "invalid_image" and not refusal.value.retryable
    assert not head.called  # nothing was fetched from a refused address


@pytest.mark.parametrize(("response", "reason"), [
    (httpx.Response(404), "could not be fetched (HTTP 404)"),
    (httpx.Response(200, headers={"content-type": "image/jpeg", "content-length": str(11 * 1024 * 1024)}),
     "the image is 11.0 MB; the limit is 10 MB"),
    (httpx.Response(200, headers={"content-type": "text/html; charset=utf-8"}), "not an image (text/html)"),
    (httpx.Response(302, headers={"location": "https://127.0.0.1/x"}), "redirects"),
])
async def test_https_images_are_checked_with_a_head_request(response: httpx.Response, reason: str) -> None:
    with respx.mock() as router:
        router.head("https://93.184.216.34/a.png").mock(return_value=response)
        images = ImageResolver(Settings(), None,  # type: ignore[arg-type]
                               resolver=resolver_for({"images.example": ["93.184.216.34"]}))
        with pytest.raises(ImageRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
            await images.model_url("https://images.example/a.png", USER)


async def test_a_public_https_image_passes() -> None:
    with respx.mock() as router:
        head = router.head("https://93.184.216.34:8443/a.png?size=2").respond(
            200, headers={"content-type": "image/png", "content-length": "1000"})
        images = ImageResolver(Settings(), None,  # type: ignore[arg-type]
                               resolver=resolver_for({"images.example": ["93.184.216.34"]}))
        url = "https://images.example:8443/a.png?size=2"
        assert await images.model_url(url, USER) == url  # the model gets the URL as it was given
    sent = head.calls.last.request
    assert sent.headers["host"] == "images.example:8443" and sent.extensions["sni_hostname"] == "images.example"


async def test_the_check_connects_to_the_address_it_checked() -> None:
    """DNS rebinding: the host answers a public address to the check and a private one a moment
    later. The HEAD request goes to the address that was checked, never resolved again."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    with respx.mock() as router:
        head = router.head(url__regex=".*").respond(200, headers={"content-type": "image/png"})
        images = ImageResolver(Settings(), None, resolver=rebinding)  # type: ignore[arg-type]
        await images.model_url("https://rebind.example/a.png", USER)
    assert [str(c.request.url) for c in head.calls] == ["https://93.184.216.34/a.png"]
    assert next(answers) == ["127.0.0.1"]  # resolved once: the second answer was never asked for


@pytest.fixture
async def tls_image_host() -> AsyncIterator[tuple[int, ssl.SSLContext, list[tuple[str | None, str | None]], trustme.CA]]:
    """A real TLS server on loopback with a certificate for images.example only: its port, a
    client context trusting its CA, (SNI, Host) of each request it got, and the CA."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.example").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    seen: list[tuple[str | None, str | None]] = []
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]

    async def image(request: web.Request) -> web.Response:
        seen.append((names[-1] if names else None, request.headers.get("Host")))
        return web.Response(content_type="image/png")

    app = web.Application()
    app.router.add_route("HEAD", "/a.png", image)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, client_context, seen, ca
    await runner.cleanup()


async def test_the_pinned_check_verifies_the_certificate_of_the_host_name(tls_image_host) -> None:
    """Over real TLS: connected to the address, the server name sent and the certificate checked
    are the URL's host name; a certificate for another name is refused."""
    port, trust, seen, _ = tls_image_host
    response = await head_pinned(f"https://images.example:{port}/a.png", ["127.0.0.1"], verify=trust)
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/png")
    assert seen == [("images.example", f"images.example:{port}")]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await head_pinned(f"https://elsewhere.example:{port}/a.png", ["127.0.0.1"], verify=trust)


async def test_the_pinned_check_tries_the_next_checked_address(tls_image_host) -> None:
    """A host with several addresses, the first not answering (nothing listens on 127.0.0.2):
    the next one checked is used, never a name resolved again."""
    port, trust, seen, _ = tls_image_host
    response = await head_pinned(f"https://images.example:{port}/a.png", ["127.0.0.2", "127.0.0.1"], verify=trust)
    assert response.status_code == 200 and len(seen) == 1
    with pytest.raises(httpx.ConnectError):
        await head_pinned(f"https://images.example:{port}/a.png", ["127.0.0.2"], verify=trust)


async def test_the_check_trusts_the_ca_bundle_the_operator_names(tls_image_host, tmp_path, monkeypatch) -> None:
    """SSL_CERT_FILE (or SSL_CERT_DIR) replaces certifi's bundle, as for the worker's other TLS
    clients: an operator whose egress re-signs TLS with a private CA names it there."""
    port, _, seen, ca = tls_image_host
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    url = f"https://images.example:{port}/a.png"
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    _tls.cache_clear()
    try:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await head_pinned(url, ["127.0.0.1"])  # certifi's bundle does not know this CA
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        _tls.cache_clear()
        response = await head_pinned(url, ["127.0.0.1"])
    finally:
        _tls.cache_clear()
    assert response.status_code == 200 and seen == [("images.example", f"images.example:{port}")]


async def test_behind_an_operators_proxy_the_check_goes_through_it(monkeypatch) -> None:
    """With HTTPS_PROXY set, the proxy connects (it resolves the name itself): the HEAD goes to
    the URL as given, through the proxy, after the same address check."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with respx.mock() as router:
        head = router.head("https://images.example/a.png").respond(200, headers={"content-type": "image/png"})
        images = ImageResolver(Settings(), None,  # type: ignore[arg-type]
                               resolver=resolver_for({"images.example": ["93.184.216.34"]}))
        assert await images.model_url("https://images.example/a.png", USER) == "https://images.example/a.png"
        with pytest.raises(ImageRefused, match="private or local address"):  # still checked first
            await ImageResolver(Settings(), None,  # type: ignore[arg-type]
                                resolver=resolver_for({"images.example": ["10.0.0.7"]})).model_url(
                "https://images.example/a.png", USER)
    assert head.call_count == 1


def put_object(conn: psycopg.Connection, user: uuid.UUID, name: str, size: int = 2048, bucket: str = "chat-attachments") -> str:
    """An upload, as the Storage API records it (under the user's role and claims)."""
    path = f"{user}/{name}"
    with request(conn, postgrest.user("u", user), commit=True) as cur:
        cur.execute("insert into storage.objects (bucket_id, name, owner, owner_id, metadata) values (%s, %s, %s, %s, %s)",
                    (bucket, path, user, str(user), json.dumps({"size": size, "mimetype": "image/png"})))
    return path


@pytest.mark.parametrize(("image", "reason"), [
    ("storage://other-bucket/{user}/a.png", "must be in the chat-attachments bucket"),
    ("storage://chat-attachments/{other}/a.png", "in your own folder"),
    ("storage://chat-attachments/{user}/../{other}/a.png", "in your own folder"),
    ("storage://chat-attachments/{user}/missing.png", "was not found in storage"),
    ("storage://chat-attachments/{user}/huge.png", "the image is 12.0 MB; the limit is 10 MB"),
    ("storage://chat-attachments/{user}/ok.png", "need SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY"),
])
async def test_storage_images_are_checked(db_url: str, conn: psycopg.Connection, image: str, reason: str) -> None:
    user, other = create_user(conn), create_user(conn)
    put_object(conn, user, "ok.png")
    put_object(conn, user, "huge.png", size=12 * 1024 * 1024)
    store = await PostgresStore.connect(db_url)
    try:
        images = ImageResolver(Settings(), store)  # no signer: the postgres transport without Supabase
        with pytest.raises(ImageRefused, match=reason):
            await images.model_url(image.format(user=user, other=other), user)
    finally:
        await store.close()


def test_the_database_refuses_other_image_schemes(conn, owner, thread) -> None:
    with request(conn, postgrest.user("owner", owner)) as cur, \
            pytest.raises(psycopg.errors.CheckViolation, match="assistant_messages_image_url_is_https_or_storage"):
        cur.execute("insert into assistant_messages (thread_id, role, content, image_url) values (%s, 'user', 'x', 'ftp://a/b.png')",
                    (thread,))


async def test_a_refused_image_never_reaches_replicate_and_the_user_reads_why(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url)
    async with running_worker_with(simulator, db_url):
        message = await say(db_url, user, thread, "what is this?", "https://127.0.0.1/secret.png")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"], run["last_error_code"]) == ("failed", 1, "invalid_image")
    assert simulator.creates == []
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == ("Sorry, I could not use the attached image: the image URL points to a private or"
                                " local address (127.0.0.1).")


def running_worker_with(simulator, db_url):
    from tests.pipeline_helpers import running_worker

    return running_worker(worker_settings(simulator.base_url), db_url)


async def test_a_storage_image_is_signed_for_the_vision_model(db_url, conn, simulator) -> None:
    emulator = SupabaseEmulator(db_url)
    await emulator.start()
    user, thread = await new_user_thread(db_url)
    path = put_object(conn, user, "scarf.png")
    worker, task, http = await start_worker(supabase_settings(simulator, emulator))
    try:
        await wait_until(lambda: asyncio_live(worker), what="the subscription")
        await say(db_url, user, thread, "what colour is it?", f"storage://chat-attachments/{path}")
        [run] = await finished_runs(db_url, 1)
    finally:
        await stop_worker(worker, task, http)
        await emulator.stop()
    assert run["status"] == "completed", run["last_error"]
    [sign] = emulator.signed
    assert sign == {"bucket": "chat-attachments", "path": path, "expiresIn": "300", "role": "service_role"}
    [create] = simulator.creates
    image = create.body["input"]["image"]
    assert image.startswith(f"{emulator.base_url}/storage/v1/object/sign/chat-attachments/{path}?token=")


async def asyncio_live(worker) -> bool:
    return worker.wakeups.live


# -- the bucket's policies, acting as the Storage API does --------------------------------------------
def storage_rows(conn: psycopg.Connection, actor: postgrest.Actor, sql: str, params: tuple) -> int | str:
    with request(conn, actor) as cur:
        try:
            cur.execute(sql, params)
        except psycopg.errors.InsufficientPrivilege:
            return "denied"
        return len(cur.fetchall()) if cur.description else cur.rowcount


def test_attachment_bucket_policies(conn) -> None:
    owner, other = create_user(conn), create_user(conn)
    path = put_object(conn, owner, "mine.png")
    as_owner, as_other, anon = postgrest.user("o", owner), postgrest.user("x", other), postgrest.anon()
    select = "select * from storage.objects where name = %s"
    assert storage_rows(conn, as_owner, select, (path,)) == 1
    assert storage_rows(conn, as_other, select, (path,)) == 0
    assert storage_rows(conn, anon, select, (path,)) == 0
    assert storage_rows(conn, as_other, "delete from storage.objects where name = %s", (path,)) == 0
    assert storage_rows(conn, as_other, "update storage.objects set metadata = '{}' where name = %s", (path,)) == 0
    # the owner cannot move (rename) their object into another user's folder
    assert storage_rows(conn, as_owner, "update storage.objects set name = %s where name = %s",
                        (f"{other}/moved.png", path)) == "denied"
    assert storage_rows(conn, as_owner, "update storage.objects set name = %s where name = %s",
                        (f"{owner}/renamed.png", path)) == 1
    upload = "insert into storage.objects (bucket_id, name, owner) values ('chat-attachments', %s, %s)"
    assert storage_rows(conn, as_other, upload, (f"{owner}/planted.png", other)) == "denied"
    assert storage_rows(conn, as_other, upload, (f"{other}/own.png", other)) == 1
    assert storage_rows(conn, anon, upload, (f"{owner}/anon.png", None)) == "denied"
    assert storage_rows(conn, as_owner, "delete from storage.objects where name = %s", (path,)) == 1
    public = conn.execute("select public, file_size_limit from storage.buckets where id = 'chat-attachments'").fetchone()
    assert public == (False, 10485760)


def test_files_rows_belong_to_their_uploader(conn, owner, thread) -> None:
    other = create_user(conn)
    row = "insert into assistant_files (thread_id, storage_path, filename, mime_type, size_bytes) values (%s, %s, 'a.png', 'image/png', 100)"
    with request(conn, postgrest.user("o", owner)) as cur:
        cur.execute(row, (thread, f"{owner}/a.png"))
        with pytest.raises(psycopg.errors.CheckViolation, match="assistant_files_path_in_own_folder"):
            cur.execute(row, (thread, f"{other}/a.png"))
    with request(conn, postgrest.user("x", other)) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute(row, (thread, f"{other}/b.png"))  # not their thread


def test_a_file_names_a_message_of_its_own_thread(conn, owner, thread) -> None:
    """A file's message must be in the file's thread: another of the user's threads is refused
    with the reason, for clients on insert and for every role on update."""
    second = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (owner,)).fetchone()[0]
    here, there = user_message(conn, owner, thread), user_message(conn, owner, second)
    other = create_user(conn)
    others_thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (other,)).fetchone()[0]
    theirs = user_message(conn, other, others_thread)
    row = ("insert into assistant_files (thread_id, message_id, storage_path, filename, mime_type, size_bytes)"
           " values (%s, %s, %s, 'a.png', 'image/png', 100) returning id")
    with request(conn, postgrest.user("o", owner), commit=True) as cur:
        attached = cur.execute(row, (thread, here, f"{owner}/here.png")).fetchone()[0]
        cur.execute(row, (thread, None, f"{owner}/loose.png"))
    for message, name in ((there, "there"), (theirs, "theirs")):
        with request(conn, postgrest.user("o", owner)) as cur, \
                pytest.raises(psycopg.errors.ForeignKeyViolation, match="a message of its own thread") as refused:
            cur.execute(row, (thread, message, f"{owner}/{name}.png"))
        assert refused.value.diag.message_hint == "message_id must be a message of the thread named by thread_id, or null"
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="a message of its own thread"), conn.transaction():
        conn.execute("update assistant_files set thread_id = %s where id = %s", (second, attached))
    conn.execute("update assistant_files set thread_id = %s, message_id = %s where id = %s", (second, there, attached))
    assert conn.execute("select count(*) from assistant_files where user_id = %s", (owner,)).fetchone()[0] == 2
