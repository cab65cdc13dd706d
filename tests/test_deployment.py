"""Deployment engine: `flwr run .` on a real SuperLink and two SuperNodes (Flower 1.41).

The SuperLink and the SuperNodes are the venv's `flower-superlink` / `flower-supernode`
console scripts, on 127.0.0.1 with free ports; `flwr run` reaches the SuperLink through a
connection written to a private ``$FLWR_HOME/config.toml``. Two variants:

- ``insecure``: plain HTTP everywhere (`--insecure`);
- ``tls-auth``: a CA and a server certificate (SAN 127.0.0.1/localhost) made here with
  ``cryptography``, SuperNode authentication on (`--enable-supernode-auth`): each node's EC
  key pair is registered with `flwr supernode register` before the node starts, and a node
  with an unregistered key is turned away.

Each message starts a fresh ClientApp process on a SuperNode, so 2 rounds take about a minute.
Every process started here is killed by PID in ``finally``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_flwr_run import _kill_all_using, _pids_using

BIN = Path(sys.executable).parent
CONNECTION = "fedkd-deploy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_tls(d: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost: ``(ca, cert, key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkd test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = d / "ca.crt", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _write_node_key(d: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC (P-384) key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` writes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


def _wait_healthy(port: int, ca: Path | None, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    import httpx

    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flower-superlink exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, verify=verify, timeout=2.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"SuperLink not healthy on {url} within {timeout:.0f}s:\n{_tail(log)}")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _children(pids: set[int]) -> set[int]:
    """All live descendants of ``pids`` (by parent PID)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier and c not in found}
        found |= frontier
    return found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["insecure", "tls-auth"])
def test_flwr_run_on_superlink_and_supernodes(tmp_path, mode):
    t0 = time.monotonic()
    secure = mode != "insecure"
    out = tmp_path / "run"
    link_port, node_ports, rogue_port = _free_port(), [_free_port(), _free_port()], _free_port()
    assert len({link_port, *node_ports, rogue_port}) == 4
    homes = {name: tmp_path / "home" / name for name in ("cli", "superlink", "node0", "node1", "rogue")}
    for h in homes.values():
        h.mkdir(parents=True)
    base_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExec and the app processes
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    env = {name: {**base_env, "FLWR_HOME": str(h)} for name, h in homes.items()}

    tls_link: list[str] = ["--insecure"]
    tls_node: list[str] = ["--insecure"]
    connection = (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n'
    )
    ca = None
    if secure:
        ca, cert, key = _write_tls(tmp_path)
        tls_link = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        tls_node = ["--root-certificates", str(ca)]
        connection += f'root-certificates = "{ca}"\n'
    else:
        connection += "insecure = true\n"
    (homes["cli"] / "config.toml").write_text(connection)

    procs: list[subprocess.Popen] = []
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as f:
            p = subprocess.Popen(
                cmd, cwd=tmp_path, env=env[name], stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(p)
        return p

    def flwr(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=REPO, env=env["cli"], capture_output=True, text=True, timeout=timeout
        )

    def diagnostics() -> str:
        return "\n".join(f"--- {n} ---\n{_tail(p)}" for n, p in logs.items())

    # Every process this test causes has one of these in its command line: the SuperLink's
    # SuperExec and the ServerApp carry 127.0.0.1:<link_port>, a SuperNode carries
    # --superlink 127.0.0.1:<link_port>, its SuperExec and ClientApps 127.0.0.1:<node_port>.
    markers = [f"{tmp_path}/", *(f"127.0.0.1:{p} " for p in (link_port, *node_ports, rogue_port))]
    try:
        link = start(
            "superlink",
            [str(BIN / "flower-superlink"), *tls_link, "--host", "127.0.0.1", "--port", str(link_port),
             "--database", str(tmp_path / "superlink.db"), "--disable-runtime-dependency-installation",
             *(["--enable-supernode-auth"] if secure else [])],
        )  # fmt: skip
        _wait_healthy(link_port, ca, link, logs["superlink"])

        auth_args: list[list[str]] = [[], []]
        if secure:  # register each SuperNode's public key before it connects
            for i in range(2):
                priv, pub = _write_node_key(tmp_path, f"node{i}-key")
                reg = flwr("supernode", "register", str(pub), CONNECTION, "--name", f"node{i}", timeout=60)
                assert reg.returncode == 0, reg.stdout + reg.stderr + diagnostics()
                auth_args[i] = ["--auth-supernode-private-key", str(priv)]
            # ... and a node whose key was never registered is turned away
            rogue_key, _ = _write_node_key(tmp_path, "rogue-key")
            rogue = start(
                "rogue",
                [str(BIN / "flower-supernode"), *tls_node, "--superlink", f"127.0.0.1:{link_port}",
                 "--host", "127.0.0.1", "--port", str(rogue_port), "--auth-supernode-private-key", str(rogue_key),
                 "--node-config", "partition-id=0 num-partitions=2", "--max-wait-time", "30"],
            )  # fmt: skip
            assert rogue.wait(timeout=60) != 0, diagnostics()
            assert "Failed to activate SuperNode" in _tail(logs["rogue"]), diagnostics()

        for i, port in enumerate(node_ports):
            start(
                f"node{i}",
                [str(BIN / "flower-supernode"), *tls_node, "--superlink", f"127.0.0.1:{link_port}",
                 "--host", "127.0.0.1", "--port", str(port), *auth_args[i],
                 # node 0 names its device (the SuperNode's own `device` wins over clients.device)
                 "--node-config", f"partition-id={i} num-partitions=2" + (" device='cpu'" if i == 0 else ""),
                 "--max-wait-time", "120"],
            )  # fmt: skip

        run_config = (
            f'rounds=2 clients.num=2 clients.architectures="mlp" clients.local-steps=10 '
            f'clients.threads=1 partition.name="iid" out="{out}"'
        )
        proc = flwr("run", ".", CONNECTION, "--run-config", run_config, "--stream", timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + diagnostics()
        deadline = time.monotonic() + 30
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (out / "summary.json").exists(), proc.stdout[-3000:] + diagnostics()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.1, summary
        assert summary["client_devices"] == {"cpu": 2}, summary  # no GPU here: auto is cpu too
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        for name, p in zip(logs, procs):  # the federation is still up: nobody crashed along the way
            assert name == "rogue" or p.poll() is None, diagnostics()
        link_log = _tail(logs["superlink"], 10**6)
        assert f"running on {'https' if secure else 'http'}://127.0.0.1:{link_port}" in link_log
        assert ("SuperNode authentication is disabled" in link_log) is not secure
    finally:
        # Not yet reaped, so their PIDs (= PGIDs, start_new_session) are still ours to signal.
        alive = [p for p in procs if p.poll() is None]
        victims = _children({p.pid for p in alive}) | {q for m in markers for q in _pids_using(m)}
        for p in alive:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in victims:  # the SuperLink's SuperExec (own session) and its ServerApp, ClientApps
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=10)
        _kill_all_using(*markers)
    assert not any(_pids_using(m) for m in markers)
    assert all(p.returncode is not None for p in procs)
    assert time.monotonic() - t0 < 300
