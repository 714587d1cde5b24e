"""Real X.509 certificates for TLS tests, made with the openssl command line.

``Certs(dir)`` makes a CA and, on request, server certificates signed by it:
``server(name, sans)`` a good one, ``expired(name, sans)`` one whose validity
ended in 2021 (``openssl ca`` with explicit dates), and ``other_ca()`` a second,
unrelated CA.  Every file is PEM; keys are unencrypted EC P-256.
"""

from __future__ import annotations

import os
import subprocess

from tests.support.tools import require_tool


class Certs:
    def __init__(self, directory):
        self.openssl = require_tool("openssl")
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.ca_cert, self.ca_key = self._self_signed("ca", "cyclemirror test CA")

    def _run(self, *args) -> None:
        proc = subprocess.run([self.openssl, *args], capture_output=True, text=True,
                              cwd=self.dir)
        if proc.returncode != 0:
            raise AssertionError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _self_signed(self, name: str, cn: str) -> tuple[str, str]:
        cert, key = self._path(f"{name}.pem"), self._path(f"{name}.key")
        self._run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-days", "30", "-subj", f"/CN={cn}", "-keyout", key, "-out", cert,
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return cert, key

    def other_ca(self) -> str:
        return self._self_signed("other-ca", "some other CA")[0]

    def _request(self, name: str, sans: str) -> tuple[str, str, str]:
        key, csr, ext = (self._path(f"{name}.key"), self._path(f"{name}.csr"),
                         self._path(f"{name}.ext"))
        self._run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
        with open(ext, "w") as fh:
            fh.write(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
                     "extendedKeyUsage=serverAuth,clientAuth\n")
        return key, csr, ext

    def server(self, name: str, sans: str = "IP:127.0.0.1,DNS:localhost") -> tuple[str, str]:
        """(certificate, key) for ``sans``, signed by the CA, valid for 30 days."""
        key, csr, ext = self._request(name, sans)
        cert = self._path(f"{name}.pem")
        self._run("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                  "-CAcreateserial", "-days", "30", "-extfile", ext, "-out", cert)
        return cert, key

    def expired(self, name: str, sans: str = "IP:127.0.0.1,DNS:localhost") -> tuple[str, str]:
        """(certificate, key) signed by the CA whose validity ended on 2021-01-02."""
        key, csr, ext = self._request(name, sans)
        cert = self._path(f"{name}.pem")
        db = self._path("ca-db")
        os.makedirs(db, exist_ok=True)
        open(os.path.join(db, "index.txt"), "w").close()
        with open(os.path.join(db, "serial"), "w") as fh:
            fh.write("1000\n")
        conf = self._path("ca.cnf")
        with open(conf, "w") as fh:
            fh.write(f"[ca]\ndefault_ca=d\n[d]\ndir={db}\ndatabase={db}/index.txt\n"
                     f"serial={db}/serial\nnew_certs_dir={db}\ndefault_md=sha256\n"
                     "policy=p\ncopy_extensions=none\n[p]\ncommonName=supplied\n")
        self._run("ca", "-batch", "-config", conf, "-cert", self.ca_cert, "-keyfile",
                  self.ca_key, "-in", csr, "-out", cert, "-startdate", "20210101000000Z",
                  "-enddate", "20210102000000Z", "-extfile", ext, "-notext")
        return cert, key
