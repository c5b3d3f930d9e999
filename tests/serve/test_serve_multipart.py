"""serve.multipart against python-multipart's streaming parser, on the same bodies."""

import random

import httpx
import pytest
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from serve.multipart import MultipartError, Part, boundary_of, parts

BOUNDARY = b"a7Bx-9q"
NAMES = ["files", "note", "chat-é", 'say "hi"', "semi;colon"]
FILENAMES = [None, "0.png", "photo é.jpg", 'quote".png', "a;b.jpg", ""]


def reference_parts(body: bytes, boundary: bytes) -> list[Part]:
    """What python-multipart reads from the body, as Parts."""
    found: list[Part] = []
    state: dict[str, bytes] = {"field": b"", "value": b"", "disposition": b"", "data": b""}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["field"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["field"] = state["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, options = parse_options_header(state["disposition"])
        filename = options.get(b"filename")
        name = options[b"name"].decode("utf-8")
        found.append(Part(name, None if filename is None else filename.decode("utf-8"), state["data"]))
        state["disposition"] = state["data"] = b""

    callbacks = {
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    parser.write(body)
    parser.finalize()
    return found


def quoted(text: str) -> bytes:
    return ('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"').encode("utf-8")


def random_body(rng: random.Random) -> bytes:
    """A well-formed body: parts with and without file names, extra headers, and data that holds line breaks,
    dashes and prefixes of the delimiter."""
    awkward = [b"\r\n", b"--", b"\r\n--", b"\r\n--" + BOUNDARY[:3], b"--" + BOUNDARY[:-1], b"\r\n\r\n", b"\xff\x00"]
    body = b""
    for _ in range(rng.randint(1, 5)):
        name, filename = rng.choice(NAMES), rng.choice(FILENAMES)
        disposition = b"form-data; name=" + quoted(name)
        if filename is not None:
            disposition += b"; filename=" + quoted(filename)
        headers = [b"Content-Disposition: " + disposition]
        if rng.random() < 0.5:
            headers.insert(rng.randint(0, 1), b"Content-Type: image/png")
        data = b"".join(rng.choice([rng.randbytes(rng.randint(0, 40)), *awkward]) for _ in range(rng.randint(0, 6)))
        body += b"--" + BOUNDARY + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--" + BOUNDARY + b"--\r\n"


def test_random_bodies_read_as_python_multipart_reads_them():
    for seed in range(300):
        body = random_body(random.Random(seed))
        assert list(parts(body, BOUNDARY)) == reference_parts(body, BOUNDARY), f"seed {seed}: {body!r}"


def test_bodies_encoded_by_an_http_client():
    request = httpx.Request(
        "POST",
        "http://test/",
        files=[("files", ("a.png", b"\x89PNG\r\n--x")), ("files", ("b.png", b""))],
        data={"note": "é"},
    )
    body = request.read()
    boundary = boundary_of(request.headers["content-type"])
    read = list(parts(body, boundary))
    assert read == reference_parts(body, boundary)
    assert [(p.name, p.filename, p.data) for p in read] == [
        ("note", None, "é".encode()),
        ("files", "a.png", b"\x89PNG\r\n--x"),
        ("files", "b.png", b""),
    ]


def test_preamble_epilogue_padding_and_a_part_without_headers_are_accepted():
    body = (
        b"a preamble\r\n--B  \t\r\nContent-Disposition: form-data; name=x\r\n\r\nX\r\n"
        b"--B\r\n\r\nno headers\r\n--B--\r\nan epilogue"
    )
    read = parts(body, b"B")
    assert next(read) == Part("x", None, b"X")
    with pytest.raises(MultipartError, match="no Content-Disposition"):
        next(read)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "no boundary delimiter"),
        (b"--C\r\n\r\nx\r\n--C--", "no boundary delimiter"),
        (b"--B", "not followed by a line break"),
        (b"--Bjunk\r\n", "not followed by a line break"),
        (b"--B\r\nContent-Disposition: form-data; name=a", "headers never end"),
        (b"--B\r\nContent-Disposition: form-data; name=a\r\n\r\ndata", "without a closing boundary"),
        (b"--B\r\nno colon here\r\n\r\nx\r\n--B--", "no colon"),
        (b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--", 'no Content-Disposition "name"'),
    ],
)
def test_malformed_bodies_say_what_is_wrong(body, reason):
    with pytest.raises(MultipartError, match=reason):
        list(parts(body, b"B"))


def test_a_content_type_without_a_boundary_is_refused():
    assert boundary_of('multipart/form-data; boundary="q;1"') == b"q;1"
    for content_type in ("multipart/form-data", "multipart/form-data; boundary="):
        with pytest.raises(MultipartError, match="no boundary"):
            boundary_of(content_type)
