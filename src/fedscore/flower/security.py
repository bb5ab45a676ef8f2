"""TLS certificates and SuperNode keys for a Flower federation, made with `cryptography`.

`make_tls` writes a self-signed CA and a SuperLink certificate it signs (for 127.0.0.1 and
localhost by default: loopback tests and demos; across machines give the SuperLink's real
host names). `make_node_key` writes an EC key pair in OpenSSH format, the form Flower's
SuperNode authentication reads (`flower-supernode --auth-supernode-private-key`,
`flwr supernode register <public key>`). Files are written owner-only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             days: int = 30) -> TLSFiles:
    """A CA and a server certificate for `hosts` (IP addresses or DNS names)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedscore test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = Path(folder)
    return TLSFiles(
        ca_cert=_write(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        server_cert=_write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        server_key=_write(folder / "server.key", _pem_key(key)),
    )


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of one SuperNode, OpenSSH format, NIST P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    folder = Path(folder)
    return _write(folder / name, private), _write(folder / f"{name}.pub", public)
