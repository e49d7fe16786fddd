"""Signatures with a provisioned project's keys: what signs checkpoints (the server's kit) and exports (a site's),
and what checks them against the project's root CA.

NVFlare's provisioning gives every participant a startup kit: startup/rootCA.pem (the project's root certificate),
and the participant's own certificate and private key (server.crt/server.key at the server, client.crt/client.key
at a site and an admin), issued by that root. A signature here is NVFlare's own scheme for signed content
(nvflare.lighter.utils.sign_content: RSA-PSS, MGF1 and SHA-256, maximal salt) over the exact bytes of a file, kept
next to it as a JSON record with the signer's certificate. It is checked by: the certificate was issued by the
trust root (its signature, by the root's key; NVFlare kits have no intermediate CAs), then the content's signature
by the certificate's key. Certificate expiry is not checked: a checkpoint outlives the kit that signed it.

Only the standard library and `cryptography` (a dependency of NVFlare), so the torch-free serving path
(exporters/onnx/predict.py) verifies exports without NVFlare's start-up.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Dict, Mapping, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .errors import NVFlareLoRAError

SCHEME = "rsa-pss-sha256"  # NVFlare's content signatures (nvflare.lighter.utils.sign_content)
ROOT_CA_FILE = "rootCA.pem"
KIT_KEYS = (("server.key", "server.crt"), ("client.key", "client.crt"))  # a server's kit; a site's or an admin's


class SignatureError(NVFlareLoRAError):
    """A signature, a certificate, a key or a trust root that cannot be used, or a signature that fails."""


def _padding():
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def _startup(kit: Path) -> Path:
    return kit / "startup" if (kit / "startup").is_dir() else kit


class Signer:
    """A participant's private key and certificate, from its startup kit (the kit folder or its startup/)."""

    def __init__(self, key, certificate: x509.Certificate, where: str):
        self.key, self.certificate, self.where = key, certificate, where

    @property
    def name(self) -> str:
        return _common_name(self.certificate)

    @classmethod
    def from_kit(cls, kit: str | Path) -> "Signer":
        startup = _startup(Path(kit).expanduser())
        for key_file, cert_file in KIT_KEYS:
            if (startup / key_file).is_file() and (startup / cert_file).is_file():
                try:
                    key = serialization.load_pem_private_key((startup / key_file).read_bytes(), password=None)
                    cert = x509.load_pem_x509_certificate((startup / cert_file).read_bytes())
                except (OSError, ValueError, TypeError) as e:
                    raise SignatureError(f"{startup / key_file} or {startup / cert_file} is not a readable private "
                                         f"key and certificate ({e}): use the kit as NVFlare provisioned it") from None
                if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
                    raise SignatureError(f"{startup / key_file} is not the RSA key of {startup / cert_file}: use the "
                                         f"kit as NVFlare provisioned it")
                return cls(key, cert, str(startup))
        raise SignatureError(f"{startup} holds no participant key and certificate (server.key and server.crt, or "
                             f"client.key and client.crt): name a startup kit NVFlare provisioned")

    def sign(self, content: bytes) -> Dict:
        """The signature record of `content`: scheme, base64 signature, the signer's name and PEM certificate."""
        signature = self.key.sign(content, _padding(), hashes.SHA256())
        return {"scheme": SCHEME, "signature": base64.b64encode(signature).decode("ascii"), "signer": self.name,
                "certificate": self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")}


class TrustRoot:
    """A project's root certificate: a rootCA.pem file, or a startup kit (folder or its startup/) holding one."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        file = _startup(path) / ROOT_CA_FILE if path.is_dir() else path
        try:
            self.certificate = x509.load_pem_x509_certificate(file.read_bytes())
        except OSError as e:
            raise SignatureError(f"trust root {file} cannot be read ({e.strerror or e}): name the project's "
                                 f"rootCA.pem, or a startup kit of the project (its startup/{ROOT_CA_FILE})") from None
        except ValueError as e:
            raise SignatureError(f"trust root {file} is not a PEM certificate ({e}): name the project's "
                                 f"rootCA.pem from a startup kit") from None
        self.path = file

    @property
    def project(self) -> str:
        return _common_name(self.certificate)

    def verify(self, content: bytes, record: Mapping, what: str) -> str:
        """Check `record` (Signer.sign's) as a signature of `content` by a participant of this project; returns
        "NAME of project PROJECT". Anything else raises SignatureError naming `what` and the reason."""
        if not isinstance(record, Mapping) or record.get("scheme") != SCHEME:
            raise SignatureError(f"{what}: its signature record is not a {SCHEME} signature; it was changed or was "
                                 f"not written by nvflare_lora")
        try:
            cert = x509.load_pem_x509_certificate(str(record["certificate"]).encode("ascii"))
            signature = base64.b64decode(str(record["signature"]), validate=True)
        except (KeyError, ValueError, TypeError) as e:
            raise SignatureError(f"{what}: its signature record is unreadable ({type(e).__name__}: {e})") from None
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise SignatureError(
                f"{what} is signed by {_common_name(cert)!r}, whose certificate was not issued by project "
                f"{self.project!r} (trust root {self.path}): it comes from another project's kit, or the signature "
                f"was replaced") from None
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise SignatureError(f"{what}: the signer's key is not RSA, which NVFlare kits use")
        try:
            public.verify(signature, content, _padding(), hashes.SHA256())
        except InvalidSignature:
            raise SignatureError(f"{what}: the signature by {_common_name(cert)!r} does not match the content: it was "
                                 f"changed after it was signed") from None
        return f"{_common_name(cert)!r} of project {self.project!r}"


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def kit_above(path: str | Path) -> Optional[Path]:
    """The startup kit that holds `path` (a server's or site's workspace keeps its jobs under the kit folder): the
    first folder at or above it with startup/rootCA.pem, or None."""
    path = Path(path).expanduser().resolve()
    for folder in [path, *path.parents]:
        if (folder / "startup" / ROOT_CA_FILE).is_file():
            return folder
    return None


def read_record(path: Path) -> Dict:
    """A signature record file (JSON) as a dict; an unreadable one raises SignatureError naming it."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SignatureError(f"signature {path} is unreadable ({e})") from None
    if not isinstance(record, dict):
        raise SignatureError(f"signature {path} is not a signature record")
    return record
