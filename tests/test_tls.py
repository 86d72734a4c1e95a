"""HTTPS: hbmon's endpoint with TLS and client certificates, scraped by the real Prometheus
and called by the real Alertmanager, both configured from the shipped ``deploy/`` files.

Certificates are made per test module with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1, a client certificate, and a second CA with its own client, whose
certificate hbmon must refuse.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import need, require_root
from helpers import free_port, http_get, metric_value, stop_process, wait_for

from hbmon.config import parse_config
from hbmon.errors import ConfigError
from hbmon.site import Site

ROOT = Path(__file__).resolve().parent.parent
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
READY = 30.0
TOKEN = "tls-test-token-0123456789abcdef"


# -- certificates ------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=hbmon test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def make_cert(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    openssl(
        "req", "-new", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip
    (folder / f"{name}.key").chmod(0o600)


@dataclass(frozen=True)
class Pki:
    folder: Path

    def __getitem__(self, name: str) -> Path:
        return self.folder / name


SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need(shutil.which("openssl") is not None, "the openssl command is missing")
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_cert(folder, "server", "ca", SERVER_EXT)
    make_cert(folder, "client", "ca", CLIENT_EXT)
    make_cert(folder, "intruder", "other-ca", CLIENT_EXT)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", "stray.key", cwd=folder)  # fmt: skip
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret",
            "-out", "encrypted.key", cwd=folder)  # fmt: skip
    for key in ("stray.key", "encrypted.key"):
        (folder / key).chmod(0o600)
    return Pki(folder)


def client_context(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca.crt"])
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}.crt"], pki[f"{cert}.key"])
    return context


# -- a daemon over HTTPS -----------------------------------------------------------------------


def tls_config(tmp_path: Path, pki: Pki, *, client_ca: bool, token: bool = True) -> str:
    lines = [
        'site = "tls"',
        f'state_dir = "{tmp_path / "state"}"',
        'method = "volume"',
        f'tls_cert_file = "{pki["server.crt"]}"',
        f'tls_key_file = "{pki["server.key"]}"',
    ]
    if client_ca:
        lines.append(f'tls_client_ca_file = "{pki["ca.crt"]}"')
    if token:
        path = tmp_path / "webhook.token"
        path.write_text(TOKEN + "\n")
        path.chmod(0o600)
        lines += ["[webhook]", f'token_file = "{path}"']
    return "\n".join(lines) + "\n"


def https(
    port: int,
    path: str,
    context: ssl.SSLContext,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


@contextlib.contextmanager
def tls_site(config_text: str, tmp_path: Path, context: ssl.SSLContext) -> Iterator[int]:
    """``hbmon run`` serving HTTPS; yields its port once /healthz answers 200."""
    config = tmp_path / "site.toml"
    config.write_text(config_text)
    port = free_port()
    log = tmp_path / "site.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hbmon.cli", "run", "-c", str(config),
             "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=tmp_path,
        )  # fmt: skip

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"hbmon run exited {proc.returncode}\n{log.read_text()}")
        try:
            return https(port, "/healthz", context)[0] == 200
        except OSError:
            return False

    try:
        wait_for(ready, READY, "hbmon /healthz over HTTPS")
        yield port
        assert proc.poll() is None, log.read_text()
    except BaseException as exc:
        exc.add_note(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()
    assert "HTTP on https://127.0.0.1:" in log.read_text()


def refused(call: Any) -> str:
    """Run ``call``; it must fail without any HTTP answer.  Returns the error's text."""
    try:
        status = call()
    except (OSError, http.client.HTTPException) as err:  # ssl.SSLError is an OSError
        return f"{type(err).__name__}: {err}"
    pytest.fail(f"expected no HTTP answer, got {status!r}")


# -- HTTPS --------------------------------------------------------------------------------------


def test_https_serves_metrics_and_refuses_plain_http(tmp_path: Path, pki: Pki) -> None:
    context = client_context(pki)
    with tls_site(tls_config(tmp_path, pki, client_ca=False), tmp_path, context) as port:
        status, text = https(port, "/metrics", context)
        assert status == 200
        assert metric_value(text, "hbmon_build_info") == 1.0
        # TLS 1.2 is enough, and nothing older is offered
        old = client_context(pki)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        assert https(port, "/healthz", old)[0] == 200
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        conn.connect()
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.close()
        # plain HTTP on the HTTPS port gets no HTTP answer
        refused(lambda: http_get(f"http://127.0.0.1:{port}/metrics"))
        # a client that does not trust hbmon's CA rejects the server
        err = refused(lambda: https(port, "/metrics", ssl.create_default_context()))
        assert "CERTIFICATE_VERIFY_FAILED" in err
        # hbmon's own client trusts the CA named by SSL_CERT_FILE (docs/operations.md)
        status = subprocess.run(
            [sys.executable, "-m", "hbmon.cli", "status", "--url", f"https://127.0.0.1:{port}",
             "--json"],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "SSL_CERT_FILE": str(pki["ca.crt"])},
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["site"] == "tls"
        # the webhook keeps its bearer token
        alerts = json.dumps({"version": "4", "alerts": []}).encode()
        assert https(port, "/api/v1/alerts", context, body=alerts)[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert https(port, "/api/v1/alerts", context, body=alerts, headers=auth)[0] == 200


def test_client_certificates_when_configured(tmp_path: Path, pki: Pki) -> None:
    good = client_context(pki, "client")
    body = json.dumps(
        {
            "version": "4",
            "alerts": [{"status": "firing", "labels": {"alertname": "HbmonHostDown", "pair": "x"}}],
        }
    ).encode()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with tls_site(tls_config(tmp_path, pki, client_ca=True), tmp_path, good) as port:
        assert https(port, "/metrics", good)[0] == 200
        # no certificate, or one from another CA: the handshake fails, nothing is served
        for who in (None, "intruder"):
            refused(lambda who=who: https(port, "/metrics", client_context(pki, who)))
            refused(lambda who=who: https(port, "/api/v1/alerts", client_context(pki, who),
                                          body=body, headers=auth))  # fmt: skip
        # with a token configured the certificate alone is not enough for the webhook
        status, text = https(port, "/api/v1/alerts", good, body=body)
        assert status == 401, text
        status, text = https(port, "/api/v1/alerts", good, body=body, headers=auth)
        assert status == 200, text
        assert json.loads(text)["decisions"][0]["action"] == "none"

    # without a token the verified client certificate is the webhook's credential
    second = tmp_path / "second"
    second.mkdir()
    config = tls_config(second, pki, client_ca=True, token=False)
    with tls_site(config, second, good) as port:
        status, text = https(port, "/api/v1/alerts", good, body=body)
        assert status == 200, text
        assert "not watched by this site" in json.loads(text)["decisions"][0]["reason"]
    assert [e["event"] for e in journal(second / "state")] == ["refused"]


def journal(state: Path) -> list[dict[str, Any]]:
    path = state / "failover.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- configuration errors ---------------------------------------------------------------------


def load(pki: Pki, tmp_path: Path, **keys: str) -> Site:
    text = f'site = "tls"\nstate_dir = "{tmp_path}"\nmethod = "volume"\n'
    text += "".join(f'{key} = "{value}"\n' for key, value in keys.items())
    return Site(parse_config(tomllib.loads(text), "site.toml"))


def problems(pki: Pki, tmp_path: Path) -> list[tuple[dict[str, str], str]]:
    crt, key = str(pki["server.crt"]), str(pki["server.key"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    garbage.chmod(0o600)
    loose = tmp_path / "loose.key"
    shutil.copy(pki["server.key"], loose)
    loose.chmod(0o644)
    missing = tmp_path / "missing.crt"
    return [
        (
            {"tls_cert_file": str(missing), "tls_key_file": key},
            f"{missing}: tls_cert_file: cannot read the file: No such file or directory",
        ),
        (
            {"tls_cert_file": crt, "tls_key_file": str(loose)},
            f"{loose}: tls_key_file: secret file is world-readable (mode 0644); "
            f"run `chmod 600 {loose}`",
        ),
        (
            {"tls_cert_file": crt, "tls_key_file": str(pki["stray.key"])},
            f"{pki['stray.key']}: tls_key_file: does not belong to the certificate in {crt}",
        ),
        (
            {"tls_cert_file": crt, "tls_key_file": str(pki["encrypted.key"])},
            f"{pki['encrypted.key']}: tls_key_file: is encrypted",
        ),
        (
            {"tls_cert_file": str(garbage), "tls_key_file": key},
            f"{key}: tls_key_file: cannot be loaded with the certificate {garbage}",
        ),
        (
            {"tls_cert_file": crt, "tls_key_file": key, "tls_client_ca_file": str(garbage)},
            f"{garbage}: tls_client_ca_file: is not a PEM file of CA certificates",
        ),
        ({"tls_cert_file": crt}, "site.toml: tls_key_file: is required with tls_cert_file"),
        ({"tls_key_file": key}, "site.toml: tls_cert_file: is required with tls_key_file"),
        (
            {"tls_client_ca_file": str(pki["ca.crt"])},
            "site.toml: tls_client_ca_file: needs tls_cert_file and tls_key_file",
        ),
    ]


def test_tls_configuration_errors_name_the_file(tmp_path: Path, pki: Pki) -> None:
    for keys, message in problems(pki, tmp_path):
        with pytest.raises(ConfigError) as err:
            load(pki, tmp_path, **keys)
        assert str(err.value).startswith(message), (keys, str(err.value))


def test_run_exits_2_on_a_bad_tls_key(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        f'site = "tls"\nstate_dir = "{tmp_path}"\nmethod = "volume"\n'
        f'tls_cert_file = "{pki["server.crt"]}"\ntls_key_file = "{pki["stray.key"]}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "hbmon.cli", "run", "-c", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"hbmon: error: {pki['stray.key']}: tls_key_file: does not belong" in result.stderr


# -- loopback by default -------------------------------------------------------------------------


@pytest.mark.root
def test_the_default_listen_address_is_loopback_only(tmp_path: Path) -> None:
    """In a network namespace of its own (so port 9799 is free), with an address besides
    loopback: a configuration without ``listen`` serves 127.0.0.1:9799 and nothing else."""
    require_root("a network namespace")
    need(shutil.which("unshare") is not None and shutil.which("nsenter") is not None,
         "unshare/nsenter (util-linux) missing")  # fmt: skip
    config = tmp_path / "site.toml"
    config.write_text(f'site = "lo"\nstate_dir = "{tmp_path}"\nmethod = "volume"\n')
    script = (
        "ip link set lo up && ip link add hbv0 type veth peer name hbv1 && "
        "ip addr add 192.0.2.1/24 dev hbv0 && ip link set hbv0 up && ip link set hbv1 up && "
        f'exec "$0" -m hbmon.cli run -c {config}'
    )
    log = tmp_path / "site.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", script, sys.executable],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        inside = ["nsenter", f"--net=/proc/{proc.pid}/ns/net"]

        def probe(host: str) -> str:
            code = (
                "import socket, sys\n"
                "try:\n"
                f"    socket.create_connection(({host!r}, 9799), timeout=2).close()\n"
                "    print('open')\n"
                "except OSError as err:\n"
                "    print(type(err).__name__)\n"
            )
            out = subprocess.run([*inside, sys.executable, "-c", code], capture_output=True,
                                 text=True, timeout=30, check=False)  # fmt: skip
            return out.stdout.strip()

        def listening() -> str | None:
            assert proc.poll() is None, log.read_text()
            out = subprocess.run([*inside, "ss", "-Hltn"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout  # fmt: skip
            return out if ":9799" in out else None

        sockets = wait_for(listening, READY, "hbmon listening in its namespace")
        local = [line.split()[3] for line in sockets.splitlines() if ":9799" in line]
        assert local == ["127.0.0.1:9799"], sockets
        assert probe("127.0.0.1") == "open"
        assert probe("192.0.2.1") == "ConnectionRefusedError"
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()


# -- the real Prometheus and Alertmanager ---------------------------------------------------------


def uncomment_tls(text: str, pki: Pki, what: str) -> str:
    """Uncomment the shipped HTTPS example lines and point them at the test's files."""
    names = {"ca_file": "ca.crt", "cert_file": "client.crt", "key_file": "client.key"}
    found = 0
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)#(scheme: https|tls_config:|  (ca_file|cert_file|key_file): \S+)$",
                     line)  # fmt: skip
        if m:
            found += 1
            line = m.group(1) + m.group(2)
            if m.group(3):
                line = re.sub(r": \S+$", f": {pki[names[m.group(3)]]}", line)
        out.append(line)
    assert found >= 4, f"{what}: the commented HTTPS example changed; update this test"
    return "\n".join(out) + "\n"


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def get_json(url: str) -> Any:
    code, body = http_get(url)
    assert code == 200, f"{url}: HTTP {code}: {body[:300]}"
    return json.loads(body)


@pytest.mark.tools
@pytest.mark.slow
def test_prometheus_scrapes_hbmon_over_tls_with_a_client_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    prometheus = shutil.which("prometheus")
    need(prometheus is not None, "prometheus not found (Debian package: prometheus)")
    assert prometheus is not None
    good = client_context(pki, "client")
    with tls_site(tls_config(tmp_path, pki, client_ca=True), tmp_path, good) as port:
        text = uncomment_tls(PROM_CONFIG.read_text(), pki, "prometheus.yml")
        text = re.sub(r"(\s+(scrape|evaluation)_interval:\s*)\S+", r"\g<1>1s", text)
        text = text.replace('targets: ["127.0.0.1:9799"]', f'targets: ["127.0.0.1:{port}"]')
        text = text.replace('targets: ["127.0.0.1:9093"]', f'targets: ["127.0.0.1:{free_port()}"]')
        # two jobs that must fail: plain HTTP, and HTTPS without the client certificate
        text += (
            f'  - job_name: plain\n    static_configs:\n      - targets: ["127.0.0.1:{port}"]\n'
            f"  - job_name: nocert\n    scheme: https\n    tls_config:\n"
            f"      ca_file: {pki['ca.crt']}\n"
            f'    static_configs:\n      - targets: ["127.0.0.1:{port}"]\n'
        )
        folder = tmp_path / "prom"
        folder.mkdir()
        (folder / "prometheus.yml").write_text(text)
        shutil.copy(PROM_CONFIG.parent / "hbmon.rules.yml", folder)
        prom_port = free_port()
        proc = start(
            [prometheus, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            folder / "prometheus.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{prom_port}"
        try:

            def health() -> dict[str, tuple[str, str]] | None:
                assert proc.poll() is None, (folder / "prometheus.log").read_text()
                try:
                    code, body = http_get(url + "/api/v1/targets", timeout=2)
                except OSError:
                    return None
                if code != 200:  # 503 while starting
                    return None
                targets = json.loads(body)["data"]["activeTargets"]
                seen = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
                if any(h == "unknown" for h, _ in seen.values()) or len(seen) < 3:
                    return None
                return seen

            seen = wait_for(health, READY, "Prometheus to scrape its three targets")
            print(f"Prometheus targets: {seen}")
            assert seen["hbmon"] == ("up", ""), seen
            assert seen["plain"][0] == "down", seen
            assert seen["nocert"][0] == "down", seen
            query = urllib.parse.quote('hbmon_build_info{job="hbmon"}')
            result = get_json(f"{url}/api/v1/query?query={query}")["data"]["result"]
            assert len(result) == 1, result
        finally:
            stop_process(proc)


@pytest.mark.tools
@pytest.mark.slow
def test_alertmanager_calls_the_webhook_over_tls(tmp_path: Path, pki: Pki) -> None:
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    need(alertmanager is not None, "alertmanager not found (Debian: prometheus-alertmanager)")
    assert alertmanager is not None
    good = client_context(pki, "client")
    with tls_site(tls_config(tmp_path, pki, client_ca=True), tmp_path, good) as port:
        text = uncomment_tls(AM_CONFIG.read_text(), pki, "alertmanager.yml")
        text = text.replace(
            "url: http://127.0.0.1:9799/api/v1/alerts",
            f"url: https://127.0.0.1:{port}/api/v1/alerts",
        )
        text = text.replace(
            "credentials_file: /etc/hbmon/webhook.token",
            f"credentials_file: {tmp_path / 'webhook.token'}",
        )
        text = re.sub(r"(\s+group_wait:\s*)\S+", r"\g<1>1s", text)
        assert f"https://127.0.0.1:{port}/" in text
        folder = tmp_path / "am"
        folder.mkdir()
        (folder / "alertmanager.yml").write_text(text)
        am_port = free_port()
        proc = start(
            [alertmanager, f"--config.file={folder / 'alertmanager.yml'}",
             f"--storage.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{am_port}",
             "--cluster.listen-address="],
            folder / "alertmanager.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{am_port}"
        try:

            def ready() -> bool:
                assert proc.poll() is None, (folder / "alertmanager.log").read_text()
                try:
                    return http_get(url + "/-/ready", timeout=2)[0] == 200
                except OSError:
                    return False

            wait_for(ready, READY, "Alertmanager ready")
            alert = [{"labels": {"alertname": "HbmonHostDown", "pair": "ghost-tls"}}]
            posted = subprocess.run(
                ["curl", "-sf", "-XPOST", "-H", "Content-Type: application/json",
                 "--data", json.dumps(alert), f"{url}/api/v2/alerts"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert posted.returncode == 0, posted.stderr
            sent = time.monotonic()

            def delivered() -> list[dict[str, Any]]:
                return [e for e in journal(tmp_path / "state") if e.get("pair") == "ghost-tls"]

            entries = wait_for(delivered, READY, "the webhook call from Alertmanager")
            print(f"Alertmanager to hbmon over TLS: {time.monotonic() - sent:.1f} s")
            assert entries[0]["event"] == "refused"
            assert "not watched by this site" in entries[0]["reason"]
            _, metrics = https(port, "/metrics", good)
            assert (
                metric_value(metrics, "hbmon_failover_total", pair="(unknown)", result="refused")
                == 1.0
            )
        finally:
            stop_process(proc)
    log = (folder / "alertmanager.log").read_text()
    assert "certificate" not in log.lower(), log[-2000:]


def test_tls_key_files_are_private_in_the_test_pki(pki: Pki) -> None:
    """The generated keys are 0600, as hbmon demands (a guard on this file's fixture)."""
    for name in ("server.key", "client.key", "stray.key", "encrypted.key"):
        assert os.stat(pki[name]).st_mode & 0o077 == 0, name
