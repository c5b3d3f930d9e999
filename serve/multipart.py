"""multipart/form-data (RFC 7578) from a body already in memory: each part's field name, file name and bytes.

The prediction route holds a whole body in memory anyway (the body limit bounds it). python-multipart parses
a stream, stepping through every part's headers one byte at a time in Python: for a one-image request that took
about as long as decoding the image. Here `bytes.find` locates each delimiter and header block, and only the
Content-Disposition parameters go through python-multipart's own parser (quoted strings and their escapes).
tests/serve/test_serve_multipart.py checks the parts against python-multipart's parser on the same bodies.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

CRLF = b"\r\n"
_PADDING = b" \t"  # transport padding allowed after a delimiter (RFC 2046 5.1.1)


class MultipartError(ValueError):
    """The body is not multipart/form-data as its Content-Type declares; the message says where."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a plain field
    data: bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type header."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise MultipartError("the multipart Content-Type has no boundary")
    return boundary


def parts(body: bytes, boundary: bytes) -> Iterator[Part]:
    """The body's parts in order; MultipartError for a missing delimiter, unterminated headers or part, or a part
    without a form-data name. The preamble and the epilogue are ignored."""
    delimiter = b"--" + boundary
    position = _first_delimiter(body, delimiter)
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):
            return  # the close delimiter
        line_end = body.find(CRLF, position)
        if line_end < 0 or body[position:line_end].strip(_PADDING):
            raise MultipartError("a boundary delimiter is not followed by a line break")
        headers, data_start = _header_block(body, line_end + 2)
        data_end = body.find(CRLF + delimiter, data_start)
        if data_end < 0:
            raise MultipartError("the body ends inside a part, without a closing boundary")
        name, filename = _disposition(headers)
        yield Part(name, filename, body[data_start:data_end])
        position = data_end + 2


def _first_delimiter(body: bytes, delimiter: bytes) -> int:
    if body.startswith(delimiter):
        return 0
    after_preamble = body.find(CRLF + delimiter)
    if after_preamble < 0:
        raise MultipartError("the body holds no boundary delimiter")
    return after_preamble + 2


def _header_block(body: bytes, start: int) -> tuple[bytes, int]:
    """A part's header lines and where its data begins."""
    if body.startswith(CRLF, start):
        return b"", start + 2
    end = body.find(CRLF + CRLF, start)
    if end < 0:
        raise MultipartError("a part's headers never end")
    return body[start:end], end + 4


def _disposition(headers: bytes) -> tuple[str, str | None]:
    """(field name, file name or None) from a part's Content-Disposition header."""
    disposition = None
    for line in headers.split(CRLF) if headers else ():
        field, colon, value = line.partition(b":")
        if not colon:
            raise MultipartError(f"a part's header line has no colon: {line[:60]!r}")
        if field.strip().lower() == b"content-disposition":
            disposition = value.strip()
    _, options = parse_options_header(disposition or b"")
    if b"name" not in options:
        raise MultipartError('a part has no Content-Disposition "name"')
    filename = options.get(b"filename")
    return _text(options[b"name"]), None if filename is None else _text(filename)


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
