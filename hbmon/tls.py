"""HTTPS for the HTTP endpoint: the server's TLS context, built from the configuration.

``tls_cert_file`` and ``tls_key_file`` turn HTTPS on (TLS 1.2 or later; plain HTTP is no
longer served on that port).  ``tls_client_ca_file`` adds client certificates: every
connection must present one signed by that CA, or the handshake fails.  The private key
is refused when others may read or rewrite it, like the other secrets.

Every problem is a :class:`~hbmon.errors.ConfigError` naming the file and the key, found
when ``hbmon run`` starts (exit 2), never at the first request.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from hbmon.config import SiteConfig, check_private
from hbmon.errors import ConfigError


def _readable(path: Path, key: str) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise ConfigError(str(path), key, f"cannot read the file: {err.strerror}") from None


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    # Without this OpenSSL would prompt on the terminal: a daemon has none to ask.
    raise _Encrypted


def server_context(config: SiteConfig) -> ssl.SSLContext | None:
    """The TLS context of the HTTP server, or None for plain HTTP."""
    cert, key, client_ca = config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
    if cert is None or key is None:
        return None
    _readable(cert, "tls_cert_file")
    check_private(key, "tls_key_file")
    _readable(key, "tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _Encrypted:
        raise ConfigError(
            str(key),
            "tls_key_file",
            "is encrypted; hbmon needs it unencrypted (`openssl pkey -in KEY -out NEW`, "
            "then `chmod 600 NEW`)",
        ) from None
    except ssl.SSLError as err:
        problem = (
            f"does not belong to the certificate in {cert} (a key and certificate of "
            "different pairs)"
            if "KEY_VALUES_MISMATCH" in str(err)
            else f"cannot be loaded with the certificate {cert}: {err.reason or err} "
            "(expected PEM: the certificate, then any intermediates; an unencrypted key)"
        )
        raise ConfigError(str(key), "tls_key_file", problem) from None
    if client_ca is not None:
        _readable(client_ca, "tls_client_ca_file")
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as err:
            raise ConfigError(
                str(client_ca),
                "tls_client_ca_file",
                f"is not a PEM file of CA certificates: {err.reason or err}",
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_certificate(transport: object) -> dict[str, object] | None:
    """The verified client certificate of a connection (its parsed fields), if any."""
    get = getattr(transport, "get_extra_info", None)
    if get is None:
        return None
    cert = get("peercert")
    return cert if isinstance(cert, dict) and cert else None
