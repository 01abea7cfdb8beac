"""The zip archives ``torch.save`` writes, read and patched without ``torch.load``.

- ``raw_tensor_bytes``: where a saved tensor's bytes lie inside a record, so a reader can
  copy them straight into their target (``reader.py``), read through an unpickler that admits
  only what ``torch.save`` of a plain tensor writes;
- ``zip_local_header``: the one parser of a record's local header;
- ``fix_zip_crcs``: rewrite the CRC-32s of a file whose bytes were filled in after
  ``torch.save`` (``convert.dcp_to_torch_file``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
_MAX_PICKLE_BYTES = 1 << 20  # a plain tensor's data.pkl is a few hundred bytes


def zip_local_header(f, info) -> tuple[bytes, int]:
    """(the fixed part of ``info``'s local file header, where the entry's bytes start) in the
    zip archive ``f`` (a seekable binary file); BadZipFile if no local header is there."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER)
    if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local file header for {info.filename} at byte {info.header_offset}")
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return header, info.header_offset + _LOCAL_HEADER + name_length + extra_length


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads a tensor record's ``data.pkl`` into (storage dtype, storage numel, offset, size,
    stride) without touching its storage bytes. Admits only what ``torch.save`` of a plain
    tensor writes; anything else raises, and the record goes through ``torch.load`` instead."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_layout
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage") and name in _TYPED_STORAGES:
            return _TYPED_STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError("not a typed storage reference")
        _, dtype, key, _location, numel = pid
        return ("storage", dtype, str(key), int(numel))


def _typed_storages() -> dict[str, torch.dtype]:
    """torch.save names a storage by its legacy typed-storage class (torch.FloatStorage, ...)."""
    import warnings

    out = {}
    for name in dir(torch):
        if not name.endswith("Storage") or name in ("Storage", "TypedStorage", "UntypedStorage"):
            continue
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage's deprecation notice
            dtype = getattr(torch, name).dtype
            if isinstance(dtype, torch.dtype) and not dtype.is_complex and not str(dtype).startswith("torch.q"):
                out[name] = dtype
    return out


_TYPED_STORAGES = _typed_storages()


def _tensor_layout(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return ("tensor", storage, int(offset), tuple(size), tuple(stride))


def record_sizes_fit(stored, length: int) -> bool:
    """Whether every entry of the ``torch.save`` record ``stored`` (a seekable file of ``length``
    bytes) is stored uncompressed and lies inside it, as ``torch.save`` writes them: a crafted
    record cannot make ``torch.load`` allocate bytes that are not there."""
    try:
        with zipfile.ZipFile(stored) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False
    return all(info.compress_type == zipfile.ZIP_STORED and info.file_size == info.compress_size
               and info.header_offset + info.compress_size <= length for info in infos)


def raw_tensor_bytes(stored, length: int | None = None) -> tuple[torch.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, offset, length) of a ``torch.save``d tensor's bytes inside ``stored`` (a
    seekable binary file of ``length`` bytes, default its ``length`` attribute), when the record
    holds one contiguous tensor that is its whole storage, stored uncompressed, little-endian;
    None for anything else (``torch.load`` reads those)."""
    length = stored.length if length is None else length

    def entry(info: zipfile.ZipInfo) -> tuple[int, int] | None:
        """(start, length) of an uncompressed entry's bytes, from its local header. Not
        ``ZipFile.read``: cairn writes these records without CRC32s (see writer.zip_crc32_off)."""
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        try:
            return zip_local_header(stored, info)[1], info.file_size
        except zipfile.BadZipFile:
            return None

    def read(info: zipfile.ZipInfo) -> bytes | None:
        where = entry(info)
        if where is None or where[1] > _MAX_PICKLE_BYTES or where[0] + where[1] > length:
            return None
        stored.seek(where[0])
        return stored.read(where[1])

    try:
        with zipfile.ZipFile(stored) as archive:
            infos = archive.infolist()
        pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
        storages = [i for i in infos if i.filename.split("/")[-2:-1] == ["data"]]
        orders = [i for i in infos if i.filename.endswith("/byteorder")]
        if len(pickles) != 1 or len(storages) != 1 or len(orders) > 1:
            return None
        if orders and read(orders[0]) != b"little":
            return None
        data_pkl = read(pickles[0])
        if data_pkl is None:
            return None
        layout = _TensorRecordUnpickler(io.BytesIO(data_pkl)).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, EOFError, KeyError,
            AttributeError, IndexError, OSError):
        return None
    info = storages[0]
    if not (isinstance(layout, tuple) and len(layout) == 5 and layout[0] == "tensor"):
        return None
    _, (_, dtype, key, numel), offset, size, stride = layout
    expected_stride, running = [], 1
    for dim in reversed(size):
        expected_stride.append(running)
        running *= dim
    if (info.filename.rsplit("/", 1)[-1] != key or offset != 0 or numel != running
            or tuple(reversed(expected_stride)) != stride or info.file_size != numel * dtype.itemsize):
        return None
    where = entry(info)
    if where is None or where[0] + where[1] > length:
        return None
    return dtype, size, where[0], where[1]


def fix_zip_crcs(path: Path) -> int:
    """Rewrite every record's CRC-32 from the bytes now in the file; returns how many changed.

    ``torch.save`` under ``skip_data`` records the CRC of the empty space it leaves; once the
    tensors are filled in, stock zip tools would call the file corrupt. Patched: the central
    directory entry, the data descriptor after the record (torch's writer uses them) and the
    local header when it holds a CRC.
    """
    with zipfile.ZipFile(path) as archive:
        infos, start_dir = archive.infolist(), archive.start_dir
    fixed: dict[str, int] = {}
    with open(path, "r+b") as f:
        for info in infos:
            local, start = zip_local_header(f, info)
            f.seek(start)
            crc, remaining = 0, info.compress_size
            while remaining:
                chunk = f.read(min(8 << 20, remaining))
                if not chunk:
                    raise zipfile.BadZipFile(f"{path}: record {info.filename} is truncated")
                crc, remaining = zlib.crc32(chunk, crc), remaining - len(chunk)
            if crc == info.CRC:
                continue
            fixed[info.filename] = crc
            end_of_data = f.tell()
            if info.flag_bits & 0x08:
                start = end_of_data + (4 if f.read(4) == b"PK\x07\x08" else 0)
                f.seek(start)
                f.write(struct.pack("<I", crc))
            if struct.unpack("<I", local[14:18])[0] != 0 or not info.flag_bits & 0x08:
                f.seek(info.header_offset + 14)
                f.write(struct.pack("<I", crc))
        position = start_dir
        for _ in infos:
            f.seek(position)
            entry = f.read(46)
            if entry[:4] != b"PK\x01\x02":
                raise zipfile.BadZipFile(f"{path}: unexpected central directory layout")
            flags = struct.unpack("<H", entry[8:10])[0]
            name_length, extra_length, comment_length = struct.unpack("<HHH", entry[28:34])
            name = f.read(name_length).decode("utf-8" if flags & 0x800 else "cp437")
            if name in fixed:
                f.seek(position + 16)
                f.write(struct.pack("<I", fixed[name]))
            position += 46 + name_length + extra_length + comment_length
        f.flush()
        os.fsync(f.fileno())
    return len(fixed)
