"""What `python -m ingest PATH` accepts: a catalogue file, a folder, or a zip of either, as rows to validate.

- A catalogue file (`.csv`, `.jsonl`, `.ndjson`): its rows; image paths are relative to its folder.
  Local photos may only be read from inside the catalogue's folder and the folders the CLI user names
  (`photo_roots`); an uploaded file's rows may only use URLs, an uploaded zip's only its own photos.
- A folder holding `catalogue.csv` / `catalogue.jsonl` / `catalogue.ndjson`: that file.
- Any other folder: images laid out by category, `root/<category>/<sub-category>/<image>`. Every image file is
  one product: id = its path below the root without the suffix, title = the file name with `_ - . +` as
  spaces, category = the folders (`A > B`), retailer = `--retailer` or the root folder's name. With
  `product_folders`, a folder that holds images and no sub-folder is one product instead: id = its path,
  title = its name, photos = its images in name order, category = the folders above it. Other files are
  reported, hidden files (`.name`) and `__MACOSX` are skipped. "line" is an entry's place in that order.
- A `.zip` of one of those: checked entry by entry, extracted to `<sources root>/<catalogue>/<stem>-<hash>/`
  and read as above (a zip whose top level is a single folder is read as that folder). The folder is kept,
  since the stored products' photo paths point into it; the same zip again reuses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ingest.readers import CSV_SUFFIXES, JSONL_SUFFIXES, CatalogueError, RawRow, read_rows
from ingest.sources import PhotoAccess
from retrieval.images import IMAGE_SUFFIXES
from schemas.report import Rejection

CATALOGUE_NAMES = ("catalogue.csv", "catalogue.jsonl", "catalogue.ndjson")
SKIPPED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
MAX_ARCHIVE_BYTES = 8 * 1024**3
FREE_SPACE_SHARE = 4  # by default a zip may unpack to at most a quarter of the free space (and MAX_ARCHIVE_BYTES)
MAX_ARCHIVE_ENTRIES = 200_000
# An entry that unpacks to more than this many times its compressed size (past 1 MiB) is taken for a bomb:
# photos barely compress and catalogue text ~10x, while a GiB of zeros packs 1000x.
MAX_COMPRESSION_RATIO = 200
RATIO_CHECKED_FROM = 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class InputError(CatalogueError):
    """An input refused as a whole (an unsafe or unreadable zip, a folder with nothing to ingest)."""


ZIP_OUTSIDE = "points outside the zip; a zipped catalogue's photos must be in the zip"
UPLOAD_LOCAL = "a local path; an uploaded catalogue file's photos must be URLs (or upload a zip with the photos)"
FOLDER_OUTSIDE = "points outside the catalogue's folder; name the photos' folder with --photo-root to allow it"


@dataclass
class CatalogueInput:
    """Raw rows to validate, which local photos they may open (relative paths start at `photos.base_dir`),
    and what was read."""

    rows: Iterator[RawRow | Rejection]
    photos: PhotoAccess
    source: str
    catalogue_file: bool  # rows from a catalogue file, not from a folder of images
    extracted: Path | None = None  # the folder a zip was extracted to by this run (None: reused, or no zip)
    zip_folder: Path | None = None  # the folder the zip's files are in, extracted by this run or an earlier one


def open_input(
    path: Path,
    *,
    catalogue: str,
    sources_root: Path,
    retailer: str | None = None,
    product_folders: bool = False,
    max_archive_bytes: int | None = None,
    max_archive_entries: int = MAX_ARCHIVE_ENTRIES,
    uploaded: bool = False,
    photo_roots: Sequence[Path] = (),
) -> CatalogueInput:
    """The rows behind PATH; file-level problems raise CatalogueError (exit 2), row-level ones are rows.
    `uploaded`: PATH came from a client (the service's ingest endpoint), so no photo on this machine may be
    named: a lone file's rows may only use URLs, a zip's only its own photos. Otherwise (a CLI user) photos
    may also come from `photo_roots`."""
    path = path.resolve()
    extra = () if uploaded else tuple(photo_roots)
    if not path.exists():
        raise CatalogueError(f"{path} does not exist")
    if path.is_file() and path.suffix.lower() == ".zip":
        extracted, fresh = extract_zip(
            path, sources_root / _safe(catalogue), max_bytes=max_archive_bytes, max_entries=max_archive_entries
        )
        root = _single_folder(extracted) or extracted
        found = _open_tree(root, retailer, root.name if root != extracted else path.stem, product_folders)
        found.photos = PhotoAccess.within(root, (extracted, *extra), ZIP_OUTSIDE, expand_user=not uploaded)
        found.source = f"{path} (extracted to {root})"
        found.extracted = extracted if fresh else None
        found.zip_folder = extracted
        return found
    if path.is_dir():
        found = _open_tree(path, retailer, path.name, product_folders)
        found.photos = PhotoAccess.within(path, (path, *extra), FOLDER_OUTSIDE)
        return found
    rows = _with_retailer(read_rows(path), retailer)
    if uploaded:  # no local file at all
        photos = PhotoAccess.within(path.parent, (), UPLOAD_LOCAL, expand_user=False)
    else:
        photos = PhotoAccess.within(path.parent, (path.parent, *extra), FOLDER_OUTSIDE)
    return CatalogueInput(rows, photos, str(path), catalogue_file=True)


def _open_tree(root: Path, retailer: str | None, folder_name: str, product_folders: bool) -> CatalogueInput:
    files = [root / name for name in CATALOGUE_NAMES if (root / name).is_file()]
    if len(files) > 1:
        raise InputError(f"{root} holds {' and '.join(f.name for f in files)}: keep one catalogue file")
    photos = PhotoAccess.within(root, (root,), FOLDER_OUTSIDE)
    if files:
        rows = _with_retailer(read_rows(files[0]), retailer)
        return CatalogueInput(rows, photos, str(files[0]), catalogue_file=True)
    rows = folder_rows(root, retailer or folder_name, product_folders=product_folders)
    return CatalogueInput(rows, photos, str(root), catalogue_file=False)


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in SKIPPED_NAMES


def _title(name: str) -> str:
    return " ".join(re.sub(r"[_\-.+]+", " ", name).split())


def folder_rows(root: Path, retailer: str, *, product_folders: bool = False) -> Iterator[RawRow | Rejection]:
    """One row per image (or per product folder), in sorted path order; other files become rejections."""
    line = 0
    unreadable: list[OSError] = []
    for folder, subfolders, names in os.walk(root, onerror=unreadable.append):
        for error in unreadable:  # a sub-folder that could not be listed: reported, never silently missing
            line += 1
            yield _unreadable(root, error, line)
        unreadable.clear()
        subfolders[:] = sorted(d for d in subfolders if not _skipped(d))
        here = Path(folder).relative_to(root)
        levels = list(here.parts)
        files = sorted(n for n in names if not _skipped(n))
        images = [n for n in files if Path(n).suffix.lower() in IMAGE_SUFFIXES]
        if product_folders and images and not subfolders and levels:
            line += 1
            yield RawRow(
                line,
                {
                    "id": here.as_posix(),
                    "retailer": retailer,
                    "title": _title(here.name),
                    "category": levels[:-1],
                    "image": [(here / n).as_posix() for n in images],
                },
            )
        else:
            for name in images:
                line += 1
                stem = here / Path(name).stem
                yield RawRow(
                    line,
                    {
                        "id": stem.as_posix(),
                        "retailer": retailer,
                        "title": _title(Path(name).stem),
                        "category": levels,
                        "image": [(here / name).as_posix()],
                    },
                )
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                continue
            line += 1
            hint = ""
            if Path(name).suffix.lower() in CSV_SUFFIXES | JSONL_SUFFIXES:
                hint = f"; to read the folder as a catalogue, name the file {CATALOGUE_NAMES[0]} or .jsonl"
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            yield Rejection(
                line=line,
                id=(here / name).as_posix(),
                field="file",
                reason=f"not an image file (images end in {suffixes}){hint}",
            )
    for error in unreadable:
        line += 1
        yield _unreadable(root, error, line)
    if line == 0:
        raise InputError(f"{root} holds no catalogue file ({', '.join(CATALOGUE_NAMES)}) and no image files")


def _unreadable(root: Path, error: OSError, line: int) -> Rejection:
    where = str(error.filename) if error.filename else None
    if where and Path(where).is_relative_to(root):
        where = Path(where).relative_to(root).as_posix()
    return Rejection(line=line, id=where, field="file", reason=f"cannot read folder: {error.strerror or error}")


def _with_retailer(rows: Iterator[RawRow | Rejection], retailer: str | None) -> Iterator[RawRow | Rejection]:
    """`--retailer` fills in rows that name none; a row's own retailer wins."""
    for row in rows:
        if retailer and isinstance(row, RawRow) and str(row.data.get("retailer") or "").strip() == "":
            row = RawRow(row.line, {**row.data, "retailer": retailer})
        yield row


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._")[:64] or "catalogue"


def _single_folder(folder: Path) -> Path | None:
    entries = [e for e in folder.iterdir() if not _skipped(e.name)]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _members(
    archive: zipfile.ZipFile, name: Path, max_bytes: int, max_entries: int
) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Every entry checked before anything is written: names, kinds, count and total size."""
    infos = archive.infolist()
    if len(infos) > max_entries:
        raise InputError(f"{name} has {len(infos):,} entries, over the limit of {max_entries:,} (MAX_ARCHIVE_ENTRIES)")
    members, seen, total = [], set(), 0
    for info in infos:
        shown = info.filename[:200]
        if "\x00" in info.filename:
            raise InputError(f"{name}: entry {shown!r} has a NUL character in its name")
        posix = info.filename.replace("\\", "/")
        if posix.startswith("/") or re.match(r"[A-Za-z]:", posix):
            raise InputError(f"{name}: entry {shown!r} has an absolute path; refusing the archive")
        parts = [p for p in PurePosixPath(posix).parts if p not in ("", ".")]
        if ".." in parts:
            raise InputError(f"{name}: entry {shown!r} climbs out of the folder with '..'; refusing the archive")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise InputError(f"{name}: entry {shown!r} is a symbolic link; refusing the archive")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InputError(f"{name}: entry {shown!r} is not a regular file or folder; refusing the archive")
        if info.flag_bits & 0x1:
            raise InputError(f"{name}: entry {shown!r} is encrypted; give an archive without a password")
        if not parts or parts[0] == "__MACOSX":
            continue
        key = "/".join(parts)
        if key in seen:
            raise InputError(f"{name}: entry {shown!r} appears twice; refusing the archive")
        seen.add(key)
        total += info.file_size
        if total > max_bytes:
            raise InputError(
                f"{name} unpacks to more than {max_bytes:,} bytes (MAX_ARCHIVE_BYTES); refusing it as a possible "
                "zip bomb, or raise the limit"
            )
        if info.file_size > RATIO_CHECKED_FROM and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise InputError(
                f"{name}: entry {shown!r} unpacks to {info.file_size:,} bytes from {info.compress_size:,} "
                f"(over {MAX_COMPRESSION_RATIO}x); refusing the archive as a possible zip bomb"
            )
        members.append((info, parts))
    return members


def _free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError as exc:
        raise InputError(f"cannot read the free space of {folder}: {exc.strerror or exc}") from None


def archive_cap(dest_parent: Path, max_bytes: int | None) -> int:
    """How many bytes a zip may unpack to: `max_bytes` when set, else MAX_ARCHIVE_BYTES or a quarter of the free
    space on the sources disk, whichever is less (so a few uploads cannot fill the disk)."""
    if max_bytes is not None:
        return max_bytes
    return max(1, min(MAX_ARCHIVE_BYTES, _free_bytes(dest_parent) // FREE_SPACE_SHARE))


def extract_zip(
    archive_path: Path,
    dest_parent: Path,
    *,
    max_bytes: int | None = None,
    max_entries: int = MAX_ARCHIVE_ENTRIES,
) -> tuple[Path, bool]:
    """Extract a zip safely into `dest_parent/<stem>-<hash>/` (reused if already there); return that folder and
    whether this call created it (a caller whose run then stores nothing removes it again).

    Refused as a whole, before anything is written: absolute names, `..`, symbolic links and other special
    entries, encrypted entries, duplicate names, entries compressed past MAX_COMPRESSION_RATIO, more than
    `max_entries` entries or `max_bytes` declared bytes (`archive_cap`: by default from the free space).
    The bytes written are counted as they stream out, per entry and in all, so an entry that unpacks to more
    than it declares is caught; whatever was written is removed when the archive is refused.
    """
    try:
        target = dest_parent / f"{_safe(archive_path.stem)}-{_sha256(archive_path)[:16]}"
    except OSError as exc:
        raise InputError(f"cannot read {archive_path}: {exc.strerror or exc}") from None
    if target.is_dir():
        return target, False
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{archive_path} is not a readable zip file: {exc}") from None
    with archive:
        max_bytes = archive_cap(dest_parent, max_bytes)
        members = _members(archive, archive_path, max_bytes, max_entries)
        try:
            dest_parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(dest_parent).free
        except OSError as exc:
            raise InputError(f"cannot create {dest_parent}: {exc.strerror or exc}") from None
        needed = sum(info.file_size for info, _ in members)
        if needed > free:
            raise InputError(f"{archive_path} unpacks to {needed:,} bytes but {dest_parent} has {free:,} free")
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=dest_parent))
        try:
            written = 0
            for info, parts in members:
                out = temporary.joinpath(*parts)
                if not out.resolve().is_relative_to(temporary.resolve()):  # cannot happen after the checks above
                    raise InputError(f"{archive_path}: entry {info.filename[:200]!r} leaves the folder")
                if info.is_dir() or info.filename.endswith(("/", "\\")):
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, out.open("xb") as sink:
                    entry = 0
                    while block := source.read(1 << 20):
                        written += len(block)
                        entry += len(block)
                        if written > max_bytes:
                            raise InputError(f"{archive_path} unpacks to more than {max_bytes:,} bytes; refusing it")
                        if entry > info.file_size:
                            shown = info.filename[:200]
                            raise InputError(f"{archive_path}: entry {shown!r} unpacks to more than it declares")
                        sink.write(block)
            try:
                temporary.rename(target)
            except OSError:
                if not target.is_dir():  # another run extracted the same zip meanwhile: use that one
                    raise
                shutil.rmtree(temporary, ignore_errors=True)
                return target, False
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            raise InputError(f"cannot extract {archive_path}: {exc}") from None
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return target, True
