"""The node's web listener: loopback by default, refusal to start when exposed without
authentication, 401 for every path but /healthz, cross-site and CSRF refusals, the console's pages
and retry/purge actions, live events, key images served only from a job's results, and the
Prometheus metrics under the names the node has always exported. In-process, no model."""

from __future__ import annotations

import http.client
import logging
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.node.config import NodeConfig
from app.node.service import NodeService, StartError
from app.web.settings import WebSettings, is_loopback
from tests.peers import LOOPBACK, free_port
from tests.web_fixtures import (
    BEARER,
    PASSWORD,
    TOKEN,
    USER,
    basic,
    call,
    fail_sends,
    png_size,
    processed_job,
    record,
    web_node,
)

AUTH = {"auth": {"token": TOKEN, "username": USER, "password": PASSWORD}}
STUDY = "1.2.826.0.1.3680043.8.498.1001"

#: Every route of the web listener but /healthz, with the method it answers.
PROTECTED = [
    ("GET", "/"), ("GET", "/studies"), ("GET", f"/studies/{STUDY}"), ("GET", "/jobs"), ("GET", "/jobs/1"),
    ("GET", "/outbox"), ("GET", "/events"), ("GET", "/api/status"), ("GET", "/metrics"), ("GET", "/readyz"),
    ("GET", "/key-images/1/pleural_effusion.png"), ("GET", "/static/console.js"), ("POST", "/jobs/1/retry"),
    ("POST", "/purge"), ("POST", "/dicomweb/studies"), ("GET", "/no-such-page"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``hyperct serve`` (CliRunner) points the root logger at its captured stderr; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


# ------------------------------------------------------------------------------------------ settings


def test_loopback_by_default_and_off_unless_enabled() -> None:
    web = NodeConfig.load(None, environ={}).web
    assert (web.enabled, web.bind, web.auth.configured) == (False, "127.0.0.1", False)
    assert web.problem() is None and not web.exposed
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("node.example")


def test_exposed_without_auth_refuses_to_start_before_anything_listens(tmp_path: Path) -> None:
    cfg = NodeConfig.load(None, environ={}, overrides={
        "data_dir": str(tmp_path / "nd"), "web.enabled": True, "web.bind": "0.0.0.0", "web.port": free_port(),
    })  # fmt: skip
    with pytest.raises(StartError, match=r"web.bind 0.0.0.0: .*without authentication; set web.auth"):
        NodeService(cfg).check()
    assert not (tmp_path / "nd").exists()
    # the same through the command line: one line, exit 2
    config = tmp_path / "node.yaml"
    config.write_text(f"node:\n  data-dir: nd\n  web: {{enabled: true, bind: 0.0.0.0, port: {free_port()}}}\n")
    result = CliRunner().invoke(cli, ["serve", "-c", str(config)])
    assert result.exit_code == 2 and "set web.auth" in result.output, result.output
    # with a token it may start (the model check comes next), warning that HTTP carries the secret
    env = {"HYPERCT_NODE_WEB_AUTH_TOKEN": TOKEN}
    cfg = NodeConfig.load(None, environ=env, overrides={"web.enabled": True, "web.bind": "0.0.0.0"})
    assert cfg.web.problem() is None
    assert any("without web.tls" in w for w in cfg.warnings())


def test_secrets_never_print_and_half_configured_auth_is_refused() -> None:
    cfg = NodeConfig.load(None, environ={"HYPERCT_NODE_WEB_AUTH_TOKEN": TOKEN})
    printed = CliRunner().invoke(cli, ["serve", "--print-config"], env={"HYPERCT_NODE_WEB_AUTH_TOKEN": TOKEN})
    assert printed.exit_code == 0 and TOKEN not in printed.output and "**********" in printed.output
    assert cfg.web.auth.token is not None and cfg.web.auth.token.get_secret_value() == TOKEN
    with pytest.raises(ValueError, match="password is missing"):
        WebSettings.from_dict({"auth": {"username": "op"}})
    with pytest.raises(ValueError, match=r"^HYPERCT_NODE_WEB_AUTH_TOKEN: node.web.auth.token: expected at least 16"):
        NodeConfig.load(None, environ={"HYPERCT_NODE_WEB_AUTH_TOKEN": "short"})


def test_web_port_may_not_be_the_health_port(tmp_path: Path) -> None:
    port = free_port()
    cfg = NodeConfig.load(None, environ={}, overrides={"web.enabled": True, "web.port": port, "health.port": port})
    with pytest.raises(StartError, match="is health.port too"):
        NodeService(cfg).check()


# ------------------------------------------------------------------------------------ authentication


def test_loopback_without_auth_serves_the_console(tmp_path: Path) -> None:
    with web_node(tmp_path) as node:
        assert node.server.url.startswith(f"http://{LOOPBACK}:")
        reply = node.get("/", auth=None)
        assert reply.status == 200 and "Node status" in reply.text
        assert reply.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in reply.headers["content-security-policy"]


def test_unauthenticated_requests_get_401_everywhere_but_healthz(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        assert node.get("/healthz", auth=None).status == 200
        for method, path in PROTECTED:
            for auth in (None, "Bearer wrong-token-0123456789", basic(USER, "wrong"), basic("intruder", PASSWORD),
                         "Basic !!notbase64", f"Token {TOKEN}"):  # fmt: skip
                reply = call(node.url, method, path, headers={"Authorization": auth} if auth else {})
                assert reply.status == 401, (method, path, auth, reply.status)
                assert reply.headers["www-authenticate"].startswith('Basic realm="HyperCT Node"')
        for auth in (BEARER, basic()):
            assert node.get("/", auth=auth).status == 200
            assert node.get("/metrics", auth=auth).status == 200
    with web_node(tmp_path / "probes", settings=AUTH, probes_only=True) as probes:
        assert probes.get("/healthz", auth=None).status == 200
        assert probes.get("/readyz", auth=None).status == 401 and probes.get("/metrics", auth=None).status == 401
        assert probes.get("/readyz").status == 200
        assert probes.get("/", auth=BEARER).status == 404  # the probe listener has no console


# ----------------------------------------------------------------------------------- CSRF, cross-site


def test_cross_site_posts_are_refused_and_a_same_site_retry_works(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        job = processed_job(node.store, tmp_path, STUDY)
        assert fail_sends(node.store) == 1
        token = node.page_token()
        origin = node.url  # http://127.0.0.1:port, the Host the client sends
        refused = [
            node.post_form(f"/jobs/{job}/retry", {"csrf": token}, token=token, **{"Sec-Fetch-Site": "cross-site"}),
            node.post_form(f"/jobs/{job}/retry", {"csrf": token}, token=token, **{"Sec-Fetch-Site": "same-site"}),
            node.post_form(f"/jobs/{job}/retry", {"csrf": token}, token=token, Origin="http://evil.example"),
            node.post_form(f"/jobs/{job}/retry", {"csrf": token}, token=None),  # no cookie
            node.post_form(f"/jobs/{job}/retry", {}, token=token),  # no field
            node.post_form(f"/jobs/{job}/retry", {"csrf": "x" * 43}, token=token),  # another value
            node.post_form("/purge", {"csrf": token, "older_than_days": "0"}, token=token,
                           **{"Sec-Fetch-Site": "cross-site"}),  # fmt: skip
            call(node.url, "POST", "/dicomweb/studies", body=b"",
                 headers={"Authorization": BEARER, "Origin": "http://evil.example",
                          "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}),  # fmt: skip
        ]
        assert [r.status for r in refused] == [403] * len(refused)
        assert node.store.outbox.counts() == {"failed": 1}  # nothing was re-queued
        done = node.post_form(f"/jobs/{job}/retry", {"csrf": token}, token=token, Origin=origin,
                              **{"Sec-Fetch-Site": "same-origin"})  # fmt: skip
        assert done.status == 303, done.text
        assert done.headers["location"].startswith(f"/jobs/{job}?msg=1+send")
        assert node.store.outbox.counts() == {"pending": 1}
        assert node.store.studies.get(STUDY)["state"] == "sending"
        page = node.get(done.headers["location"])
        assert "1 send(s) re-queued" in page.text


def test_purge_forgets_finished_studies_and_their_folders(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        job = processed_job(node.store, tmp_path, STUDY, destination="PACS@127.0.0.1:1")
        for item in node.store.outbox.due(now=time.time() + 10):
            node.store.outbox.result(item, True, "sent", next_attempt_at=None)
        assert node.store.studies.get(STUDY)["state"] == "done"
        token = node.page_token("/studies")
        kept = node.post_form("/purge", {"csrf": token, "older_than_days": "30"}, token=token)
        assert kept.status == 303 and "purged+0" in kept.headers["location"]
        gone = node.post_form("/purge", {"csrf": token, "older_than_days": "0"}, token=token)
        assert gone.status == 303 and "purged+1" in gone.headers["location"]
        assert node.store.studies.get(STUDY) is None and not (tmp_path / "results" / str(job)).exists()


# ------------------------------------------------------------------------------------ console pages


def test_pages_show_studies_jobs_outbox_findings_and_key_images(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        job = processed_job(node.store, tmp_path, STUDY)
        fail_sends(node.store, "PACS@127.0.0.1:1: association refused")
        record(node.store, "1.2.826.0.1.3680043.8.498.2002", "1.2.826.0.1.3680043.8.498.2002.1")
        status = node.get("/").text
        assert 'id="receiver"' in status and 'id="disk"' in status and "association refused" in status
        studies = node.get("/studies").text
        assert f'data-study="{STUDY}" data-state="failed"' in studies and 'data-state="receiving"' in studies
        jobs = node.get("/jobs").text
        assert f'data-job="{job}" data-state="done"' in jobs and f'class="retry" data-job="{job}"' in jobs
        outbox = node.get("/outbox").text
        assert 'data-state="failed"' in outbox and "association refused" in outbox
        study = node.get(f"/studies/{STUDY}").text
        assert 'data-task="pleural_effusion" class="present"' in study and "0.910" in study
        assert f'src="/key-images/{job}/pleural_effusion.png"' in study and "SYNTHETIC DEMO MODEL" in study
        image = node.get(f"/key-images/{job}/pleural_effusion.png")
        assert image.status == 200 and image.headers["content-type"] == "image/png"
        assert png_size(image.body) == (640, 608)
        assert "HCT-TEST" not in status + studies + jobs + outbox + study  # no PatientID on the console
        assert node.get("/studies/1.2.3.4").status == 404 and node.get("/jobs/999").status == 404
        api = node.get("/api/status")
        assert api.status == 200 and '"queue_depth":0' in api.text


def test_key_images_come_only_from_the_jobs_results(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        job = processed_job(node.store, tmp_path, STUDY)
        bad = processed_job(node.store, tmp_path, "1.2.826.0.1.3680043.8.498.3003",
                            key_image_listed="../../../../state.sqlite")  # a results.json pointing out  # fmt: skip
        (tmp_path / "secret.png").write_bytes(b"\x89PNG not yours")
        for path in (
            f"/key-images/{job}/lung_nodule.png",  # a finding without a key image
            f"/key-images/{job}/nothing.png",
            f"/key-images/{job}/pleural_effusion.txt",
            f"/key-images/{job}/..%2F..%2F..%2Fsecret.png",
            f"/key-images/{job}/%2e%2e%2fsecret.png",
            f"/key-images/{job}/../../secret.png",
            f"/key-images/{bad}/pleural_effusion.png",
            "/key-images/999/pleural_effusion.png",
        ):
            reply = node.get(path)
            assert reply.status == 404, (path, reply.status)
            assert b"not yours" not in reply.body and b"SQLite" not in reply.body


def test_live_events_announce_changes(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        parts = urllib.parse.urlsplit(node.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/events", headers={"Authorization": BEARER})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")

        def next_event() -> str:
            while True:
                line = resp.fp.readline().decode()
                if line.startswith("event: "):
                    return line.strip()

        assert next_event() == "event: change"  # at the start
        record(node.store, STUDY, f"{STUDY}.1")
        assert next_event() == "event: change"  # a study arrived
        conn.close()
    # the stream ended with the listener (no hang at shutdown)


# -------------------------------------------------------------------------------------------- metrics


def test_metrics_keep_their_names(tmp_path: Path) -> None:
    with web_node(tmp_path, settings=AUTH) as node:
        processed_job(node.store, tmp_path, STUDY)
        node.handle.counters["instances_failed"] += 2
        text = node.get("/metrics").text
        for line in (
            "# TYPE hyperct_instances_received_total counter", "hyperct_instances_received_total 1.0",
            "hyperct_instances_failed_total 2.0", "# TYPE hyperct_associations_rejected_total counter",
            'hyperct_studies{state="sending"} 1.0', 'hyperct_jobs{state="done"} 1.0',
            'hyperct_outbox{state="pending"} 1.0', "hyperct_studies_processed_total 1.0",
            "# TYPE hyperct_failures_total counter", "hyperct_queue_depth 0.0",
            "# TYPE hyperct_processing_seconds summary", "hyperct_processing_seconds_count 1.0",
        ):  # fmt: skip
            assert line in text, line
        assert "hyperct_studies_processed_total 1" in text  # what test_node_e2e reads


# ---------------------------------------------------------------------------------------------- TLS


def test_https_with_the_nodes_tls_settings(tmp_path: Path) -> None:
    import ssl
    import urllib.error
    import urllib.request

    from tests.peers import make_tls_files

    tls = make_tls_files(tmp_path / "tls")
    settings = {**AUTH, "tls": {"certificate": str(tls.server_cert), "key": str(tls.server_key)}}
    with web_node(tmp_path / "node", settings=settings) as node:
        assert node.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(tls.ca))
        request = urllib.request.Request(f"{node.url}/", headers={"Authorization": BEARER})
        with urllib.request.urlopen(request, context=trusted, timeout=10) as reply:
            assert reply.status == 200 and b"Node status" in reply.read()
        assert "secure" in (reply.headers.get("set-cookie") or "").lower()  # the CSRF cookie: HTTPS only
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{node.url}/healthz", context=ssl.create_default_context(), timeout=10)
