"""Small local-filesystem helpers: durable writes, atomic swaps, deletes, hashing, writeback.

Only what a POSIX filesystem offers; the commit protocol built from these lives in
``commit.py`` and ``local.py``. Files are opened without following symbolic links and only
when they are regular files (``open_regular``): a checkpoint never leads a reader to a
device, a FIFO or a file outside its folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import xxhash

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.layout import HF_INDEX_NAME, METADATA_NAME, TRASH_PREFIX

logger = logging.getLogger("cairn")

CHUNK_BYTES = 8 << 20


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies inside it (shorter lines); a URI as is."""
    if "://" in os.fspath(path):
        return os.fspath(path)
    path = Path(path)
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


# --- opening files safely ----------------------------------------------------------------------

class NotRegularFileError(CheckpointError):
    """A checkpoint path that is a symbolic link, a device, a FIFO or a socket: never read."""


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, in words ("a symbolic link", "a FIFO", ...)."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_stat(path: str | os.PathLike) -> os.stat_result:
    """``lstat`` of ``path``, which must be a regular file (no link followed); FileNotFoundError
    if it is missing, NotRegularFileError naming it and what it is otherwise."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFileError(f"{path} is {file_kind(info.st_mode)}; cairn reads only regular files in a "
                                  "checkpoint and never follows links")
    return info


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """An fd of the regular file ``path``, opened without following a symbolic link and without
    blocking on a FIFO; NotRegularFileError for anything but a regular file."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFileError(f"{path} is a symbolic link; cairn never follows links in a checkpoint") \
                from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path} is {file_kind(mode)}; cairn reads only regular files in a checkpoint")
        if flags & os.O_ACCMODE == os.O_RDONLY and hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (see ``open_regular``); CheckpointError when it is
    larger than ``limit``, before anything is read (and never more than ``limit`` bytes are
    read, should the file grow meanwhile)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit} such a file can hold")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(-1 if limit is None else limit + 1)
        if limit is not None and len(data) > limit:
            raise CheckpointError(f"{path}: grew past the {limit} bytes such a file can hold while read")
        return data
    finally:
        os.close(fd)


def open_own_file(path: str | os.PathLike, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o600) -> int:
    """An fd of the regular file ``path`` to write in place, created (``mode``) if missing, never
    through a symbolic link and never a FIFO or device; NotRegularFileError naming it when it is
    one of those, belongs to another user or has another name (a hard link: writing it would
    write that file too). Nothing is truncated before these checks (``flags`` must not hold
    ``O_TRUNC``): truncate the fd afterwards."""
    if flags & getattr(os, "O_TRUNC", 0):
        raise ValueError("open_own_file: truncate the returned fd instead of passing O_TRUNC")
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFileError(f"{path} is a symbolic link; cairn never writes through links") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{path} is {file_kind(info.st_mode)}; cairn writes only regular files")
        if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
            raise NotRegularFileError(f"{path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()})")
        if info.st_nlink > 1:
            raise NotRegularFileError(f"{path} has {info.st_nlink} names (hard links); cairn writes only files "
                                      "of one name")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_dir(path: str | os.PathLike) -> Path:
    """``path``, a directory that is not a symbolic link; NotRegularFileError naming it otherwise."""
    path = Path(path)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise NotRegularFileError(f"{path} is a symbolic link; cairn never follows links in a checkpoint folder")
    if not stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is {file_kind(info.st_mode)}, not a checkpoint directory")
    return path


# --- durability ---------------------------------------------------------------------------------

def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new entries in ``path`` durable (no-op where dirs cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, *, mode: int = 0o666, sync: bool = True) -> None:
    """Write through a temporary name, fsync (unless ``sync`` is False), rename: ``path`` is
    whole or absent. The temporary name is made afresh (exclusive create, no link followed):
    whatever lay there, a link to another file included, is replaced, never written through."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.rename(tmp, path)


def hash_file(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None,
              limit: int | None = None) -> tuple[int, str]:
    """(size, xxh3-128 hex) of the regular file ``path``, read in large chunks; at most ``limit``
    bytes are read (a file that grew past what its manifest says is not read to its end)."""
    digest = xxhash.xxh3_128()
    size = 0
    fd = open_regular(path)
    try:
        total = os.fstat(fd).st_size if limit is None else min(limit, os.fstat(fd).st_size)
        buffer = bytearray(min(CHUNK_BYTES, total + 1))
        view = memoryview(buffer)
        while size < total:
            n = os.readv(fd, [view[:min(len(buffer), total - size)]])
            if not n:
                break
            digest.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


# --- atomic swaps and deletes ------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the platform or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def remove_tree(path: Path) -> bool:
    """Delete a directory tree; log and return False on failure instead of raising."""
    def ignore_vanished(function, name, error):
        error = error[1] if isinstance(error, tuple) else error
        if not isinstance(error, FileNotFoundError):  # another thread may be deleting the same trash
            raise error

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=ignore_vanished)
        else:
            shutil.rmtree(path, onerror=ignore_vanished)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        logger.warning("could not delete %s (%s); the next run's start-up cleanup will retry", path, e)
        return False


def tree_usage(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes, files) under ``path`` (a file: its own), never following links."""
    if not os.path.isdir(path) or os.path.islink(path):
        with contextlib.suppress(OSError):
            return os.lstat(path).st_size, 1
        return 0, 0
    total = count = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
                count += 1
    return total, count


def trash_name(name: str) -> str:
    """A fresh trash name for the entry ``name`` (see layout.TRASH_PREFIX)."""
    return f"{TRASH_PREFIX}{name.lstrip('.')}-{uuid.uuid4().hex[:8]}"


def discard(path: Path) -> bool:
    """Rename ``path`` to a trash name (one atomic step out of sight), then delete it.

    Used after a commit: failures are logged, never raised (the new step is already live).
    """
    trash = path.parent / trash_name(path.name)
    try:
        os.rename(path, trash)
    except OSError as e:
        logger.warning("could not remove %s (%s); the next run's start-up cleanup will retry", path, e)
        return False
    fsync_dir(path.parent)
    return remove_tree(trash)


def unlink_quietly(path: Path) -> bool:
    try:
        path.unlink(missing_ok=True)
        return True
    except OSError as e:
        logger.warning("could not delete %s: %s", path, e)
        return False


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a Hugging Face safetensors directory (an index or ``*.safetensors``, no DCP metadata)."""
    path = Path(path)
    if not path.is_dir() or (path / METADATA_NAME).exists():
        return False
    return (path / HF_INDEX_NAME).is_file() or any(path.glob("*.safetensors"))


# --- writeback ----------------------------------------------------------------------------------

# Writeback is started every WRITEBACK_BYTES of a file (see start_writeback); the
# environment variable CAIRN_WRITEBACK_MB sets another size, 0 leaves writeback to the kernel.
WRITEBACK_BYTES = 64 << 20
WRITEBACK_ENV = "CAIRN_WRITEBACK_MB"


def writeback_bytes() -> int:
    """How often (bytes) a writer starts writeback: ``$CAIRN_WRITEBACK_MB`` MiB, else
    ``WRITEBACK_BYTES``; 0 for never."""
    value = os.environ.get(WRITEBACK_ENV, "").strip()
    if not value:
        return WRITEBACK_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise CheckpointError(f"{WRITEBACK_ENV}={value!r}: expected a number of MiB >= 0 (0 leaves writeback "
                              "to the kernel)")
    return int(megabytes * (1 << 20))


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages in ``offset .. offset + length`` to
    disk now, without waiting for them (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``);
    False where the platform or filesystem has no such call. Durability still comes from the
    fsync at the file's end.

    Without it Linux starts writing a file's dirty pages only once a tenth or so of the host's
    memory is dirty (``vm.dirty_background_ratio``) or after 30 s, so on a large host a save of
    many GB fills the page cache with the disk idle and then waits for the whole of it in the
    final fsync: the save takes copy time plus disk time instead of the larger of the two, and
    anything done alongside the copy (the checksum) adds to it. With writeback started as the
    bytes go out, the disk works from the first write on, and once its queue is full this call
    waits for it, which keeps the writer at the disk's pace.
    """
    if _sync_file_range is None or length <= 0:
        return False
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        return False  # e.g. ESPIPE, EINVAL on a filesystem without it: the fsync does it all
    return True


def free_space_text(path: str | os.PathLike) -> str:
    """"1.2 GB free of 50.0 GB on /data" for the filesystem holding ``path`` (or its nearest
    existing parent); "free space unknown" where that cannot be asked."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        info = os.statvfs(path)
    except OSError:
        return "free space unknown"
    return f"{info.f_bavail * info.f_frsize / 1e9:.2f} GB free of {info.f_blocks * info.f_frsize / 1e9:.1f} GB " \
           f"on {path}"
