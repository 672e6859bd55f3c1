"""TLS certificates for the SuperLink and device keys for SuperNode authentication.

Made with the ``cryptography`` package (no openssl / ssh-keygen needed):

* :func:`ensure_server_certs` keeps ``DIR/ca.pem`` (+ ``ca.key``) and ``DIR/server.pem`` (+
  ``server.key``): a private CA (EC P-256, 10 years) and a server certificate (EC P-256,
  ``serverAuth``, 825 days) whose subject alternative names are the host names / IP
  addresses the devices use, plus ``127.0.0.1`` and ``localhost`` (the SuperLink's own
  SuperExec connects to it over TLS). Missing files are generated, existing ones are
  checked (a server certificate that does not name a requested host is an error, not
  silently replaced). Devices get ``ca.pem`` only (``--root-certificates``).
* :func:`generate_device_key` writes an ECDSA P-384 key pair in OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read);
  :func:`read_public_key` / :func:`read_private_key` check such files.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from common.errors import FedcbirError

CA_DAYS = 3650
SERVER_DAYS = 825
LOOPBACK = ("127.0.0.1", "localhost")
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServerCerts:
    ca: Path
    cert: Path
    key: Path
    created: tuple[str, ...]  # file names written now ("" when all existed)
    names: tuple[str, ...]  # names/IPs the server certificate is valid for


def _x509():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - flwr depends on cryptography
        raise FedcbirError("the 'cryptography' package is needed for certificates and keys") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def default_names(host: str) -> list[str]:
    """Names a certificate should carry for a SuperLink bound to ``host``: the host itself,
    or, for a wildcard bind, this machine's host name, FQDN and outward IP address."""
    if host not in WILDCARDS:
        return [host]
    names = [socket.gethostname()]
    try:
        fqdn = socket.getfqdn()
        if fqdn and fqdn not in names:
            names.append(fqdn)
    except OSError:
        pass
    try:  # the address used for the default route (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
            if ip and not ip.startswith("127."):
                names.append(ip)
    except OSError:
        pass
    return names


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str):
    x509, _, _, _, _, NameOID = _x509()
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcbir"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    _, _, serialization, _, _, _ = _x509()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_cert(path: Path):
    x509 = _x509()[0]
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FedcbirError(f"{path} is not a readable PEM certificate: {exc}") from None


def _load_key(path: Path):
    serialization = _x509()[2]
    try:
        return serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise FedcbirError(f"{path} is not a readable unencrypted PEM private key: {exc}") from None


def make_ca(directory: Path, common_name: str = "fedcbir federation CA") -> None:
    x509, hashes, serialization, ec, _, _ = _x509()
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / "ca.key", _pem_key(key))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(directory: Path, names: Iterable[str]) -> tuple[str, ...]:
    """Issue ``server.pem``/``server.key`` from ``ca.pem``/``ca.key`` in ``directory``."""
    x509, hashes, serialization, ec, ExtendedKeyUsageOID, _ = _x509()
    if not (directory / "ca.key").is_file():
        raise FedcbirError(f"{directory / 'ca.key'} is missing: cannot issue a server certificate "
                           f"(put server.pem and server.key there, or use an empty folder)")
    ca_cert, ca_key = _load_cert(directory / "ca.pem"), _load_key(directory / "ca.key")
    wanted = list(dict.fromkeys([*(n for n in names if n and n not in WILDCARDS), *LOOPBACK]))
    sans = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in wanted]
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(wanted[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(directory / "server.key", _pem_key(key))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return tuple(wanted)


def cert_names(path: Path) -> tuple[str, ...]:
    """DNS names and IP addresses in a certificate's subject alternative names."""
    x509 = _x509()[0]
    cert = _load_cert(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName)) + \
        tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))


def verify_chain(ca_path: Path, cert_path: Path) -> None:
    """The server certificate must be signed by the CA and currently valid."""
    ec = _x509()[3]
    ca, cert = _load_cert(ca_path), _load_cert(cert_path)
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # noqa: BLE001 - InvalidSignature, or a CA key of another type
        raise FedcbirError(f"{cert_path} was not issued by {ca_path}") from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FedcbirError(f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                           f"{cert.not_valid_after_utc:%Y-%m-%d})")


def ensure_server_certs(directory: str | os.PathLike, names: Iterable[str]) -> ServerCerts:
    """Use or create ``ca.pem``, ``server.pem`` and ``server.key`` in ``directory`` (see module doc)."""
    d = Path(directory).expanduser().resolve()
    names = [n for n in names if n and n not in WILDCARDS]
    created: list[str] = []
    have = {n: (d / n).is_file() for n in ("ca.pem", "ca.key", "server.pem", "server.key")}
    if not have["ca.pem"]:
        if have["server.pem"] or have["server.key"]:
            raise FedcbirError(f"{d} has a server certificate but no ca.pem: add the CA certificate that "
                               f"signed it (devices need it) or use an empty folder")
        make_ca(d)
        created += ["ca.pem", "ca.key"]
    if have["server.pem"] != have["server.key"]:
        raise FedcbirError(f"{d} has only one of server.pem / server.key")
    if not (d / "server.pem").is_file():
        make_server_cert(d, names)
        created += ["server.pem", "server.key"]
    verify_chain(d / "ca.pem", d / "server.pem")
    valid = cert_names(d / "server.pem")
    missing = [n for n in [*names, "127.0.0.1"] if n not in valid and n.lower() not in (v.lower() for v in valid)]
    if missing:
        raise FedcbirError(f"{d / 'server.pem'} is not valid for {', '.join(missing)} (it names "
                           f"{', '.join(valid) or 'nothing'}): remove server.pem and server.key to have a new "
                           f"one issued, or pass the names it has with --advertise")
    return ServerCerts(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key", created=tuple(created),
                       names=valid)


def read_root_certificates(path: str | os.PathLike) -> Path:
    """Check a ``--root-certificates`` file (PEM, at least one certificate)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedcbirError(f"--root-certificates {p}: no such file")
    x509 = _x509()[0]
    try:
        certs = x509.load_pem_x509_certificates(p.read_bytes())
    except (OSError, ValueError):
        certs = []
    if not certs:
        raise FedcbirError(f"--root-certificates {p}: not a PEM certificate (use the server's ca.pem)")
    return p.resolve()


# ----------------------------------------------------------------------------- device keys


def generate_device_key(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``DIR/NAME`` (OpenSSH private key, mode 600) and ``DIR/NAME.pub``: ECDSA P-384."""
    _, _, serialization, ec, _, _ = _x509()
    if not name or "/" in name or name.startswith("."):
        raise FedcbirError(f"invalid key name {name!r}")
    d = Path(directory).expanduser()
    priv, pub = d / name, d / f"{name}.pub"
    for p in (priv, pub):
        if p.exists():
            raise FedcbirError(f"{p} already exists: not overwriting a device key (pick another --name)")
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub.write_bytes(line + f" {name}\n".encode())
    return priv, pub


_NIST = ("secp256r1", "secp384r1", "secp521r1")


def read_public_key(path: str | os.PathLike):
    """An OpenSSH ECDSA public key on a NIST curve (what Flower accepts), or a clear error."""
    _, _, serialization, ec, _, _ = _x509()
    p = Path(path)
    try:
        key = serialization.load_ssh_public_key(p.read_bytes().strip())
    except (OSError, ValueError) as exc:
        raise FedcbirError(f"{p} is not an OpenSSH public key: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - UnsupportedAlgorithm
        raise FedcbirError(f"{p}: unsupported key type ({exc}); make one with 'edge-client keygen'") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _NIST:
        raise FedcbirError(f"{p}: Flower needs an ECDSA key on a NIST curve (make one with 'edge-client keygen')")
    return key


def read_private_key(path: str | os.PathLike):
    _, _, serialization, ec, _, _ = _x509()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedcbirError(f"--auth-key {p}: no such file")
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise FedcbirError(f"--auth-key {p}: not an unencrypted OpenSSH private key ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - UnsupportedAlgorithm
        raise FedcbirError(f"--auth-key {p}: unsupported key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _NIST:
        raise FedcbirError(f"--auth-key {p}: Flower needs an ECDSA key on a NIST curve "
                           f"(make one with 'edge-client keygen')")
    return key
