"""Reading files that may come from anyone: bounded, contained, verified, never executed.

Every model source (run and checkpoint folders, ``save_pretrained`` folders, released MDLM folders
and ``.ckpt`` files, hub snapshots, evaluator folders) is read through these helpers:

* :func:`member` resolves a file inside a model folder and refuses one whose real path (after
  symbolic links) lies outside the folder, or outside ``root`` when the folder is a view into a
  larger store (a Hugging Face hub snapshot links into the repository's ``blobs/``);
* :func:`read_json` / :func:`read_text` refuse files over a size limit before reading them, and
  name the file in every error (bad UTF-8, bad JSON, wrong top-level type);
* :func:`check_torch_archive` admits only the exact zip layout ``torch.save`` writes (uncompressed
  records ``data.pkl``, ``byteorder``, ``version``, ``.format_version``, ``.storage_alignment``,
  ``.data/*``, ``data/<n>`` under one folder),
  before any ``torch`` loading function sees the file: a TorchScript archive (``code/``,
  ``constants.pkl``), which ``torch.load`` would hand to ``torch.jit.load`` and so run code from
  the file, is refused, as are compressed records (zip bombs) and records larger than the file;
* :func:`sha256_file` is the checksum that checkpoints and exported folders record for their files;
* :func:`output_file` / :func:`write_output` check a result file's place before the work and turn a
  failed write (a full disk) into a one-line error after it.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

JSON_LIMIT = 256 * 2**20  # tokenizer.json of the largest open models is ~10-20 MB
TEXT_LIMIT = 16 * 2**20  # YAML configs, model cards
PICKLE_LIMIT = 256 * 2**20  # data.pkl of a Lightning checkpoint: metadata and tensor references only
TORCH_RECORD = re.compile(r"(data\.pkl|byteorder|version|\.format_version|\.storage_alignment|\.data/version|"
                          r"\.data/serialization_id|data/\d+)")


class CheckpointError(ValueError):
    """Missing, corrupt or incompatible checkpoint or model file."""


class UnsafeFileError(CheckpointError):
    """A file that is refused before it is read: too large, outside its folder, or of a layout that
    could run code."""


def member(folder: Path, name: str, root: Path | None = None) -> Path:
    """``folder / name``, refused when its real path is outside ``root`` (default ``folder``)."""
    path = Path(folder) / name
    boundary = Path(root or folder).resolve()
    real = path.resolve()
    if real != boundary and boundary not in real.parents:
        raise UnsafeFileError(f"{path} links to {real}, outside {boundary}; refusing to read it")
    return path


def _bounded(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    if size > limit:
        raise UnsafeFileError(f"{path} is {size:,} bytes, more than the {limit:,} this file may have")
    return path.read_bytes()


def read_text(path: Path, limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of ``path`` (at most ``limit`` bytes)."""
    data = _bounded(Path(path), limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def read_json(path: Path, kind: type = dict, limit: int = JSON_LIMIT) -> Any:
    """The JSON value in ``path``, which must be of type ``kind`` (a dict by default)."""
    try:
        value = json.loads(read_text(path, limit))
    except json.JSONDecodeError as exc:
        raise UnsafeFileError(f"corrupt {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UnsafeFileError(f"{path} nests too deeply to be read") from None
    if not isinstance(value, kind):
        raise UnsafeFileError(f"{path} holds a JSON {type(value).__name__}, a {kind.__name__} was expected")
    return value


def check_torch_archive(path: Path) -> None:
    """Refuse ``path`` unless it is a zip archive exactly as ``torch.save`` writes it."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnsafeFileError(f"{path} is not a readable zip archive ({exc})") from None
    folders = {r.filename.split("/", 1)[0] for r in records}
    if len(folders) != 1:
        raise UnsafeFileError(f"{path}: a torch.save archive holds one folder, this one {len(folders)}")
    names = set()
    for r in records:
        name = r.filename.split("/", 1)[1] if "/" in r.filename else ""
        if name in ("constants.pkl", "code/") or name.startswith("code/"):
            raise UnsafeFileError(f"{path} is a TorchScript archive (it holds {r.filename}); it contains code "
                                  f"and is never loaded")
        if not TORCH_RECORD.fullmatch(name):
            raise UnsafeFileError(f"{path} holds {r.filename!r}, which a torch.save archive does not have")
        if r.compress_type != zipfile.ZIP_STORED or r.file_size > size:
            raise UnsafeFileError(f"{path}: record {r.filename} is compressed or larger than the file "
                                  f"(torch.save stores records as they are)")
        names.add(name)
    if "data.pkl" not in names:
        raise UnsafeFileError(f"{path} has no data.pkl: not a torch.save archive")
    pickle = next(r for r in records if r.filename.endswith("/data.pkl"))
    if pickle.file_size > PICKLE_LIMIT:
        raise UnsafeFileError(f"{path}: data.pkl is {pickle.file_size:,} bytes, more than {PICKLE_LIMIT:,}")


class OutputFileError(ValueError):
    """A result cannot be written where the user asked (a folder, a missing folder, a full disk)."""


def output_file(path: str | Path, flag: str) -> Path:
    """``path`` (given with ``flag``) checked before any work: not a folder, inside an existing folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputFileError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise OutputFileError(f"{flag} {path}: the folder {path.parent} does not exist")
    return path


def write_output(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path``; an OSError (a full disk, ``/dev/full``) is a one-line error naming it."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutputFileError(f"{flag} {path} could not be written: {exc.strerror or exc}") from None


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    """The SHA-256 of the bytes of ``path``, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
