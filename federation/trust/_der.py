"""Just enough DER to assemble a leaf certificate from a template (the signing fast path), pure.

The template is a real certificate made once by ``cryptography``'s builder; the fast path splits its
to-be-signed part into its elements and replaces only serial, validity, public key and SAN. Tests check that the
result is byte-identical to what the builder makes for the same inputs.
"""

from __future__ import annotations

import base64
from datetime import datetime

SEQUENCE = 0x30
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
BOOLEAN_TRUE = b"\x01\x01\xff"
OID_SAN = b"\x06\x03\x55\x1d\x11"
URI_TAG = 0x86  # [6] IMPLICIT IA5String, GeneralName.uniformResourceIdentifier


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + length(len(content)) + content


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative integers are not needed here")
    body = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    if body[0] & 0x80:
        body = b"\x00" + body
    return tlv(INTEGER, body)


def time(t: datetime) -> bytes:
    """RFC 5280: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, UTC."""
    if t.year < 2050:
        return tlv(UTC_TIME, t.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, t.strftime("%Y%m%d%H%M%SZ").encode())


def elements(der: bytes) -> list[bytes]:
    """The complete TLVs inside one constructed DER value (its header skipped)."""
    content, _ = _content(der, 0)
    out = []
    pos = 0
    while pos < len(content):
        start = pos
        _, pos = _content(content, pos)
        out.append(content[start:pos])
    return out


def _content(der: bytes, pos: int) -> tuple[bytes, int]:
    first = der[pos + 1]
    if first < 0x80:
        n, hdr = first, 2
    else:
        k = first & 0x7F
        n, hdr = int.from_bytes(der[pos + 2 : pos + 2 + k], "big"), 2 + k
    start = pos + hdr
    end = start + n
    if end > len(der):
        raise ValueError("truncated DER")
    return der[start:end], end


def san_uri_extension(uri: str) -> bytes:
    """Extension { subjectAltName, critical, [ URI ] } (critical for every leaf, whatever its subject)."""
    names = tlv(SEQUENCE, tlv(URI_TAG, uri.encode("ascii")))
    return tlv(SEQUENCE, OID_SAN + BOOLEAN_TRUE + tlv(OCTET_STRING, names))


def pem_certificate(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"
