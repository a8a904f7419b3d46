"""schemathesis hooks for medrelay's contract run (scripts/contract): request bodies of the
document media types are real documents (PDFs of the corpus, small valid photos), not random
bytes, so that schema-valid uploads are accepted and the stateful phase follows real jobs."""

import base64
import os
import pathlib
import struct
import zlib

import schemathesis
from hypothesis import strategies as st

CORPUS = pathlib.Path(os.environ["MEDRELAY_CORPUS"])


def _png(width=2, height=2):
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# A 1x1 lossless WebP and a 1x1 baseline JPEG (both decode with the service's decoders).
WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEAYABgAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwc"
    "KDcpLDAxNDQ0Hyc5PTgyPC4zNDL/wAALCAABAAEBAREA/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtR"
    "AAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3"
    "ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5us"
    "LDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/9oACAEBAAA/APn+iiigD//Z"
)
PDFS = [p.read_bytes() for p in sorted(CORPUS.glob("*.pdf")) if "password" not in p.name]
assert PDFS, f"no PDF in {CORPUS}"

pdfs = st.sampled_from(PDFS)
documents = st.sampled_from(PDFS[:4] + [_png(), JPEG, WEBP])

# `POST /v1/documents` takes any of the four as its multipart form's `file` part (declared
# `application/octet-stream`).
schemathesis.openapi.media_type("application/octet-stream", documents)
# tus: the bytes of a document from its first byte (a PATCH at another offset is a 409 anyway).
schemathesis.openapi.media_type("application/offset+octet-stream", pdfs)

CHECKSUM = __import__("re").compile(
    r"^(sha1|sha256) ([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$"
)


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """A positive case's `Upload-Checksum` is the body's real sha256.

    The header's pattern needs a space, which schemathesis's header generator cannot produce;
    it then falls back to a value that breaks the pattern (and gets the 400 the tus protocol
    requires). Here the positive case is made what it claims to be; negative cases are sent as
    generated.
    """
    headers = case.headers or {}
    checksum = headers.get("Upload-Checksum")
    mode = getattr(getattr(case.meta, "generation", None), "mode", None) if case.meta else None
    # Only a case known to be positive is touched.
    if checksum is None or CHECKSUM.match(checksum) or not str(mode).lower().endswith("positive"):
        return
    import hashlib

    body = case.body if isinstance(case.body, (bytes, bytearray)) else b""
    headers["Upload-Checksum"] = "sha256 " + base64.b64encode(hashlib.sha256(body).digest()).decode()
    case.headers = headers
