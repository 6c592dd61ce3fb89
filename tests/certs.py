"""Test certificates made at test time with the openssl CLI (no keys in the repository).

`CertFactory(tmpdir)` makes one CA, then `leaf(name, sans)` makes a key and a
certificate for those subject alternative names, signed by the CA.  EC P-256
keys: fast to generate.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass

_serial = itertools.count(1000)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Leaf:
    cert: str
    key: str


class CertFactory:
    def __init__(self, directory: str, ca_name: str = "edgeproxy test CA"):
        self.dir = directory
        self.ca_key = os.path.join(directory, "ca.key")
        self.ca_cert = os.path.join(directory, "ca.pem")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", self.ca_key)
        _openssl("req", "-x509", "-new", "-key", self.ca_key, "-sha256", "-days", "2", "-subj", f"/CN={ca_name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-out", self.ca_cert)

    def leaf(self, name: str, sans: list[str], tag: str = "") -> Leaf:
        """A certificate for ``sans`` ("DNS:a.test", "IP:127.0.0.1") with CN ``name``; ``tag`` keeps files apart."""
        base = os.path.join(self.dir, f"{name.replace('*', 'star')}{tag}")
        key, csr, cert, ext = base + ".key", base + ".csr", base + ".pem", base + ".ext"
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", csr)
        with open(ext, "w") as fh:
            fh.write(f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth\n")
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key, "-set_serial",
                 str(next(_serial)), "-days", "2", "-sha256", "-extfile", ext, "-out", cert)
        return Leaf(cert, key)
