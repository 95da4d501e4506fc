"""A multipart upload streamed straight to a file on disk, with a size cap, never held in memory.

Starlette's form parser would spool a large file to the system's temporary folder before the handler runs,
and only then could its size be checked. Here the request body is parsed as it arrives
(python-multipart's streaming parser): the file part is written, block by block, to a fresh folder under
the given parent (the sources folder, on the same disk as the extracted catalogues), the upload is refused
(413) as soon as it passes its cap, and the small text fields beside it are kept in memory up to 1 KiB
each. Anything unexpected (no boundary, a second file, an unknown field, a file with another suffix) is
refused with a message, and the folder is removed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from schemas.text import printable

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 1024
UPLOADS = ".uploads"  # under the sources folder: one folder per upload, removed when its job is over
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class UploadRefused(Exception):
    """The request is not an acceptable upload: `status` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """The uploaded file (alone in its own folder: `discard` removes both) and the text fields."""

    folder: Path
    filename: str = ""
    path: Path | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stored_bytes(folder: Path) -> int:
    """Bytes of the uploads under `folder` (one sub-folder each) waiting for their jobs."""
    total = 0
    for entry in folder.glob("*/*") if folder.is_dir() else ():
        try:
            total += entry.lstat().st_size
        except OSError:  # removed meanwhile: its job ended
            pass
    return total


def safe_name(filename: str, suffix: str) -> str:
    """A file name for the client's one: its stem with only letters, digits, `_` and `-`, and `suffix`."""
    stem = _UNSAFE.sub("_", Path(filename.replace("\\", "/")).stem).strip("_-")[:80]
    return f"{stem or 'upload'}{suffix}"


class _Parts:
    """python-multipart callbacks: collect the headers of each part, route its data to the file or a field."""

    def __init__(
        self, upload: Upload, file_field: str, suffixes: frozenset[str], max_bytes: int, fields: frozenset[str]
    ) -> None:
        self.upload = upload
        self.file_field = file_field
        self.suffixes = suffixes
        self.max_bytes = max_bytes
        self.fields = fields
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.name: str | None = None
        self.is_file = False
        self.value = bytearray()
        self.blocks: list[bytes] = []  # file data parsed from the last chunk, written after it

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.disposition, self.name, self.is_file, self.value = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise UploadRefused(422, "a form part has no name (Content-Disposition: form-data; name=...)")
        self.name = options[b"name"].decode("utf-8", "replace")
        if self.name == self.file_field:
            if self.upload.path is not None:
                raise UploadRefused(422, f"give one '{self.file_field}' only")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            suffix = Path(filename.replace("\\", "/")).suffix.lower()
            if suffix not in self.suffixes:
                allowed = ", ".join(sorted(self.suffixes))
                shown = printable(filename, limit=200)
                raise UploadRefused(422, f"'{self.file_field}' must be a file named *{{{allowed}}}, not {shown!r}")
            self.is_file = True
            self.upload.filename = printable(filename, limit=200)  # quoted in messages and logs
            self.upload.path = self.upload.folder / safe_name(filename, suffix)
        elif self.name not in self.fields:
            expected = ", ".join(sorted({self.file_field, *self.fields}))
            raise UploadRefused(422, f"unexpected form field {printable(self.name, limit=64)!r} (fields: {expected})")
        elif self.name in self.upload.fields:
            raise UploadRefused(422, f"give the field {self.name!r} once")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise UploadRefused(413, f"the upload is larger than {self.max_bytes} bytes (MAX_INGEST_UPLOAD_BYTES)")
            self.blocks.append(data[start:end])
        else:
            self.value += data[start:end]
            if len(self.value) > MAX_FIELD_BYTES:
                raise UploadRefused(422, f"the field {self.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if not self.is_file and self.name is not None:
            self.upload.fields[self.name] = self.value.decode("utf-8", "replace")


async def receive_upload(
    request: Request,
    *,
    parent: Path,
    file_field: str,
    suffixes: frozenset[str],
    max_bytes: int,
    fields: frozenset[str] = frozenset(),
) -> Upload:
    """Parse a multipart/form-data body as it arrives: one file (`file_field`, a name ending in one of
    `suffixes`, at most `max_bytes`) written to a new folder under `parent`, and the text `fields`.
    UploadRefused (415, 413 or 422, with a message) otherwise; nothing is left on disk then."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(415, f"send the catalogue as multipart/form-data with a '{file_field}' file field")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        upload = Upload(Path(tempfile.mkdtemp(prefix="upload-", dir=parent)))
    except OSError as exc:
        raise UploadRefused(507, f"cannot store the upload: {exc.strerror or exc}") from None
    parts = _Parts(upload, file_field, suffixes, max_bytes, fields)
    sink: IO[bytes] | None = None
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            if parts.blocks:
                if sink is None:
                    assert upload.path is not None  # set when the file part began
                    sink = await run_in_threadpool(upload.path.open, "xb")
                blocks, parts.blocks = parts.blocks, []
                await run_in_threadpool(sink.writelines, blocks)
        parser.finalize()
        if parser.state != MultipartState.END:
            raise UploadRefused(422, "the multipart body ends before its closing boundary")
        if sink is None and upload.path is not None:
            upload.path.touch()  # an empty file part: refused below, with the others
    except FormParserError as exc:
        upload.discard()
        raise UploadRefused(422, f"the multipart body cannot be parsed: {exc}") from None
    except ClientDisconnect:
        upload.discard()
        raise UploadRefused(400, "the client went away before the upload was complete") from None
    except OSError as exc:
        upload.discard()
        raise UploadRefused(507, f"cannot store the upload: {exc.strerror or exc}") from None
    except BaseException:
        upload.discard()
        raise
    finally:
        if sink is not None:
            sink.close()
    if upload.path is None:
        upload.discard()
        raise UploadRefused(422, f"the form has no '{file_field}' file")
    if upload.size == 0:
        upload.discard()
        raise UploadRefused(422, f"the uploaded file {upload.filename!r} is empty")
    return upload
