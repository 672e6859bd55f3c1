"""Deployment pieces that need no running federation: certificates, device keys, argument
checks and the SuperNode failure messages (texts measured from flower-supernode 1.42).

The full deployments (TLS + auth with three frameworks, a dying device, a killed and resumed
server) are in ``test_deploy_slow.py``.
"""
from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from common.errors import FedcbirError  # noqa: E402


# ----------------------------------------------------------------------------- certificates


def test_server_certs_are_made_once_verified_and_checked(tmp_path):
    from cryptography import x509

    from common.certs import ensure_server_certs, verify_chain

    d = tmp_path / "certs"
    c = ensure_server_certs(d, ["fleet.example.lan", "192.168.1.10"])
    assert set(c.created) == {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert {"fleet.example.lan", "192.168.1.10", "127.0.0.1", "localhost"} <= set(c.names)
    verify_chain(c.ca, c.cert)
    for key in (d / "ca.key", d / "server.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(c.cert.read_bytes())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca = x509.load_pem_x509_certificate(c.ca.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # reused as they are (same CA for the devices), and a name the certificate lacks is an error
    before = c.cert.read_bytes()
    again = ensure_server_certs(d, ["fleet.example.lan"])
    assert again.created == () and c.cert.read_bytes() == before
    with pytest.raises(FedcbirError, match="not valid for other.lan"):
        ensure_server_certs(d, ["other.lan"])
    # a server certificate from another CA is refused
    other = ensure_server_certs(tmp_path / "other", ["fleet.example.lan"])
    (d / "server.pem").write_bytes(other.cert.read_bytes())
    with pytest.raises(FedcbirError, match="was not issued by"):
        ensure_server_certs(d, ["fleet.example.lan"])


def test_openssl_accepts_the_chain(tmp_path):
    import shutil

    from common.certs import ensure_server_certs

    if not shutil.which("openssl"):
        pytest.skip("no openssl binary")
    c = ensure_server_certs(tmp_path, ["127.0.0.1"])
    out = subprocess.run(["openssl", "verify", "-CAfile", str(c.ca), str(c.cert)], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout


def test_wildcard_host_gets_this_machines_names():
    from common.certs import default_names

    assert default_names("10.0.0.5") == ["10.0.0.5"]
    names = default_names("0.0.0.0")
    assert names and "0.0.0.0" not in names


# ----------------------------------------------------------------------------- device keys


def test_keygen_makes_an_openssh_p384_pair(tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edge_client.cli import main

    assert main(["keygen", str(tmp_path / "keys"), "--name", "pi-kitchen"]) == 0
    priv, pub = tmp_path / "keys" / "pi-kitchen", tmp_path / "keys" / "pi-kitchen.pub"
    assert priv.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ") and pub.read_text().strip().endswith("pi-kitchen")
    key = serialization.load_ssh_private_key(priv.read_bytes(), None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert serialization.load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert "--authorized-keys" in capsys.readouterr().out
    assert main(["keygen", str(tmp_path / "keys"), "--name", "pi-kitchen"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_non_ecdsa_keys_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from common.certs import read_private_key, read_public_key
    from server.deploy import authorized_keys

    k = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pub").write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH))
    (tmp_path / "ed").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    with pytest.raises(FedcbirError, match="ECDSA"):
        read_public_key(tmp_path / "ed.pub")
    with pytest.raises(FedcbirError, match="ECDSA"):
        read_private_key(tmp_path / "ed")
    with pytest.raises(FedcbirError, match="ECDSA"):
        authorized_keys(str(tmp_path))
    with pytest.raises(FedcbirError, match="no such folder"):
        authorized_keys(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedcbirError, match="no \\*.pub"):
        authorized_keys(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- addresses and arguments


@pytest.mark.parametrize("text,ok", [("127.0.0.1:9092", ("127.0.0.1", 9092)), ("pi.lan:80", ("pi.lan", 80)),
                                     ("[::1]:9092", ("::1", 9092)), ("127.0.0.1", None), ("https://a:1", None),
                                     ("host:0", None), ("host:port", None), (":9092", None)])
def test_parse_address(text, ok):
    from common.flower import parse_address

    if ok:
        assert parse_address(text) == ok
    else:
        with pytest.raises(FedcbirError):
            parse_address(text)


def _edge(argv, capsys):
    from edge_client.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_edge_client_refuses_bad_input_in_one_line(tmp_path, capsys, sample_catalog):
    from common.certs import generate_device_key

    base = ["--catalog", str(sample_catalog), "--num-partitions", "2"]
    priv, _ = generate_device_key(tmp_path, "dev")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        (["--superlink", "10.0.0.1", "--partition-id", "0", "--insecure"], "expected HOST:PORT"),
        (["--superlink", "10.0.0.1:9092", "--partition-id", "2", "--insecure"], "--partition-id must be in 0..1"),
        (["--superlink", "10.0.0.1:9092", "--partition-id", "0", "--root-certificates", str(tmp_path / "no.pem")],
         "no such file"),
        (["--superlink", "10.0.0.1:9092", "--partition-id", "0", "--root-certificates", str(tmp_path / "junk.pem")],
         "not a PEM certificate"),
        (["--superlink", "10.0.0.1:9092", "--partition-id", "0", "--insecure", "--auth-key", str(priv)],
         "--auth-key needs TLS"),
        (["--superlink", "10.0.0.1:9092", "--partition-id", "0", "--auth-key", str(tmp_path / "x")], "no such file"),
        (["--superlink", "10.0.0.1:9092", "--partition-id", "0", "--insecure", "--profile", "toaster"], "toaster"),
    ]
    for args, text in cases:
        rc, out = _edge([*base, *args], capsys)
        assert rc == 2, (args, out)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], (args, out)
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        _edge([*base, "--superlink", "a:1", "--partition-id", "0", "--insecure", "--root-certificates", "x"], capsys)


def test_server_refuses_bad_settings_before_starting_anything(tmp_path, capsys, sample_catalog):
    from fedcbir.cli import main

    base = ["server", "--catalog", str(sample_catalog), "--min-clients", "2", "--out", str(tmp_path / "run")]
    (tmp_path / "empty").mkdir()
    cases = [
        (["--require-auth", "--insecure", "--authorized-keys", str(tmp_path)], "needs TLS"),
        (["--require-auth"], "--authorized-keys"),
        (["--require-auth", "--authorized-keys", str(tmp_path / "none")], "no such folder"),
        (["--require-auth", "--authorized-keys", str(tmp_path / "empty")], "no *.pub files"),
        (["--set", "num-server-rounds=4"], "use its own option (--rounds)"),
        (["--set", "no-such-key=1"], "unknown run-config key"),
        (["--resume"], "no checkpoint"),
        (["--strategy", "magic"], "strategy 'magic'"),
    ]
    for args, text in cases:
        rc = main([*base, *args])
        err = capsys.readouterr().err
        assert rc == 2 and text in err and "Traceback" not in err, (args, err)
    rc = main(["server", "--catalog", str(sample_catalog), "--min-clients", "0", "--out", str(tmp_path / "r")])
    assert rc == 2 and "--min-clients must be >= 1" in capsys.readouterr().err


def test_server_run_config(tmp_path, sample_catalog):
    import argparse

    from server.deploy import register, run_config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["server", "--catalog", str(sample_catalog), "--rounds", "5", "--min-clients", "3",
                              "--out", "rel/run", "--round-timeout", "30", "--set", "width=0.5",
                              "--set", "fp16-upload=true"])
    rc = run_config_from_args(args)
    assert rc["num-server-rounds"] == 5 and rc["min-nodes"] == 3 and rc["round-timeout"] == 30.0
    assert rc["width"] == 0.5 and rc["fp16-upload"] is True and rc["client-state-dir"] == ""
    assert Path(rc["out"]).is_absolute() and Path(rc["catalog"]) == sample_catalog.resolve()


# ----------------------------------------------------------------------------- SuperNode failure messages


_EXIT = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n{}\n" \
        "The SuperNode could not establish a connection to the SuperLink.\n"


@pytest.mark.parametrize("output,insecure,kind", [
    (_EXIT.format("[code: 2004] Failed to activate SuperNode."), False, "unregistered"),
    (_EXIT.format("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the "
                  "CLI."), False, "auth-required"),
    (_EXIT.format("Server disconnected without sending a response."), True, "tls-required"),
    (_EXIT.format("Server disconnected without sending a response."), False, "unreachable"),
    ("ERROR :     SSL/TLS handshake error detected.\n" + _EXIT.format(
        "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"), False, "tls-mismatch"),
    (_EXIT.format("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
                  "certificate (_ssl.c:1006)"), False, "bad-certificate"),
    (_EXIT.format("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate "
                  "is not valid for '10.0.0.2'. (_ssl.c:1006)"), False, "bad-certificate"),
    (_EXIT.format("[Errno 111] Connection refused"), False, "unreachable"),
    (_EXIT.format("All connection attempts failed"), False, "unreachable"),
    (_EXIT.format("[Errno -2] Name or service not known"), False, "unreachable"),
    ("ERROR :     Exit Code: 302\nUnable to parse the private key file.\n", False, "bad-key"),
    (_EXIT.format("[code: 9999] Something new."), False, "failed"),
])
def test_supernode_failures_become_one_clear_line(output, insecure, kind):
    from edge_client.deploy import classify_failure

    err = classify_failure(output, 1, "10.0.0.2:9092", insecure=insecure, root_certificates="/x/ca.pem",
                           auth_key="/k/dev", tries=6)
    assert err.kind == kind, str(err)
    assert "\n" not in str(err) and "10.0.0.2:9092" in str(err) or kind == "bad-key"
    if "mismatch" in output:
        assert "--advertise" in str(err)
    if kind == "failed":
        assert "Something new" in str(err)


# ----------------------------------------------------------------------------- the edge-client's supervision


FAKE_SUPERNODE = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    counter = Path(sys.argv[1])
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    say = lambda s: print(s, flush=True)
    if n == 1:  # joins, answers one train message, then the SuperLink restarts and forgets it
        say("INFO :      SuperNode ID: 42")
        say("INFO :      [RUN 7]")
        say("INFO :      Receiving: train message (ID: a)")
        say("INFO :      [RUN 7]")
        say("INFO :      Sending: train message (ID: b)")
        say("RuntimeError: Heartbeat failed unexpectedly. The SuperLink does not recognize this SuperNode.")
        time.sleep(60)
    elif n == 2:  # joins again, then the SuperLink is unreachable for all retries: Flower hangs
        say("INFO :      SuperNode ID: 43")
        say("WARNING :   Giving up reconnection after 0.85 seconds and 2 tries.")
        say("ERROR :     [Errno 111] Connection refused")
        time.sleep(60)
    elif n == 3:  # the server is still starting
        say("ERROR :     Exit Code: 305")
        say("Failed to initialize the connection to the SuperLink.")
        say("[Errno 111] Connection refused")
        sys.exit(1)
    else:  # a non-transient failure ends the edge-client
        say("Unable to parse the private key file.")
        sys.exit(1)
""")


def test_edge_client_rejoins_a_lost_superlink_then_reports_a_fatal_error(tmp_path, monkeypatch):
    import edge_client.deploy as deploy

    script, counter = tmp_path / "fake_supernode.py", tmp_path / "attempts"
    script.write_text(FAKE_SUPERNODE)
    monkeypatch.setattr(deploy, "supernode_command", lambda o, nc, port: [sys.executable, str(script), str(counter)])
    monkeypatch.setattr(deploy, "apply_device_limits", lambda o, say: None)  # leave this process's threads alone
    for name in ("GAVE_UP_GRACE", "REJOIN_PAUSE", "RETRY_PAUSE"):
        monkeypatch.setattr(deploy, name, 0.5)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x").write_text("")
    lines: list[str] = []
    opts = deploy.JoinOptions(superlink="127.0.0.1:9", profile="host", framework="torch", catalog=tmp_path / "cat",
                              partition_id=0, num_partitions=1, insecure=True, reconnect_timeout=60,
                              log=tmp_path / "sn.log")
    with pytest.raises(deploy.ConnectError) as exc:
        deploy.join(opts, say=lines.append)
    assert exc.value.kind == "bad-key" and counter.read_text() == "4"
    assert lines[0].startswith("connected to the SuperLink at 127.0.0.1:9 as node 42")
    assert lines[1].startswith("train #1: trained and replied in") and lines[1].endswith("(run 7)")
    assert "no longer knows this node" in lines[2] and "reconnecting" in lines[2]
    assert lines[3].startswith("reconnected to the SuperLink at 127.0.0.1:9 as node 43")
    assert "unreachable for all retries" in lines[4]
    assert len(lines) == 5  # the refused attempt while the server restarts is retried quietly
    assert "Connection refused" in (tmp_path / "sn.log").read_text()
