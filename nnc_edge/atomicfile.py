"""Files replaced atomically: the new content goes to a temporary file beside the target, which is
fsynced and renamed over it, so that after a crash or a kill the target is the old file or the new
one, never a mix.

A temporary file is ``.NAME.<8 hex digits>SUFFIX`` in the target's directory (the same file system,
so the rename is atomic), created with O_CREAT | O_EXCL: a name that exists, a symbolic link
planted there included, is never opened, so a guessed name cannot redirect the write. A writer
that is killed leaves its temporary file behind. So each writer, when it starts, removes the stale
temporary files of its own pattern (its target and suffix) and nothing else: a device that is
interrupted often does not fill its storage. That assumes one writer per target at a time, as
for a device's model.

A failed write removes its temporary file whatever closing it does (on a full disk closing
flushes, and fails again). Errors name the target, never the temporary file.

    with replacing("model.nnc") as f:
        f.write(data)
"""

import contextlib
import errno
import os
import re
import shutil

__all__ = ["temp_beside", "commit", "discard", "remove", "clear_stale", "replacing", "write_file", "place",
           "sync_directory", "Batch"]

_RANDOM_BYTES = 4  # 8 hex digits in the name


def _pattern(base, suffix):
    return re.compile(re.escape("." + base + ".") + "[0-9a-f]{%d}" % (2 * _RANDOM_BYTES) + re.escape(suffix) + r"\Z")


def clear_stale(path, suffix=".tmp"):
    """Remove the temporary files that writers of ``path`` with this ``suffix`` left beside it."""
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = _pattern(base, suffix)
    try:
        names = os.listdir(directory)
    except OSError:
        return  # no directory: nothing stale; creating the new file reports the problem
    for name in names:
        if pattern.match(name):
            remove(os.path.join(directory, name))


def _about(exc, path, tmp=None):
    """An OSError of the temporary file ``tmp`` (or of no file) as one about the target ``path``."""
    if exc.errno is None or exc.filename not in (None, tmp):
        return exc
    return OSError(exc.errno, exc.strerror, os.fspath(path))


def temp_beside(path, suffix=".tmp"):
    """(binary file open for reading and writing, its path): a new temporary file for replacing
    ``path``, after the stale ones of its pattern were removed.

    Its mode is what a plain open() would give the target (0666 minus the umask): tempfile.mkstemp's
    0600 would take read access from a replaced model file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    directory, base = os.path.split(os.path.abspath(path))
    clear_stale(path, suffix)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, ".%s.%s%s" % (base, os.urandom(_RANDOM_BYTES).hex(), suffix))
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _about(exc, path, tmp) from exc
        return os.fdopen(fd, "w+b"), tmp


def _sync(f, tmp, path):
    """Flush, fsync and close the temporary file of ``path``."""
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    except OSError as exc:
        raise _about(exc, path, tmp) from exc


def _rename(tmp, path):
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise _about(exc, path, tmp) from exc


def _directory(path):
    return os.path.dirname(os.path.abspath(path))


def sync_directory(directory):
    """fsync a directory, so that a rename in it survives a power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # directories cannot be opened on every platform; the rename is done
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(f, tmp, path):
    """fsync ``f`` (the temporary file ``tmp`` of ``path``), rename it onto ``path``, fsync the
    directory. On an error the caller still owns the temporary file (see ``discard``)."""
    _sync(f, tmp, path)
    _rename(tmp, path)
    sync_directory(_directory(path))


def place(source, target):
    """Make ``target`` the same bytes as the file ``source``, atomically: a hard link (no copy) where
    the file system has them, else a copy, fsynced; renamed over ``target``, the directory fsynced."""
    target = os.fspath(target)
    directory, base = os.path.split(os.path.abspath(target))
    clear_stale(target)
    tmp = os.path.join(directory, ".%s.%s.tmp" % (base, os.urandom(_RANDOM_BYTES).hex()))
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (FAT, some network file systems), or the name is taken: copy
        with open(source, "rb") as src, replacing(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    try:
        _rename(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    sync_directory(directory)


def discard(f, tmp):
    """Close and remove a temporary file on a failure path: removed even when closing fails."""
    try:
        if f is not None:
            f.close()
    except OSError:
        pass  # the failure being handled is the one to report
    finally:
        if tmp is not None:
            remove(tmp)


def remove(path):
    """Remove a file that has to go, on a failure path or as a leftover: if it is already gone, or
    cannot go, what is being done or reported matters more."""
    try:
        os.remove(path)
    except OSError:
        pass


class Batch:
    """Several files replaced together, all or none.

    ``add(path)`` makes a target's temporary file at once, so that a target that cannot be written
    is found before anything is; the caller writes the files, then ``commit()`` fsyncs every one
    and only then renames them, in the order added. On a failure the temporary files are removed,
    and so are the targets this batch created: a rename can still fail when the directory changes
    under us, and a target that existed is then either replaced or as it was.
    """

    def __init__(self):
        self._files = []  # [file, temporary path, target, target existed before]

    def add(self, path, suffix=".tmp"):
        """The temporary file (binary, open for reading and writing) whose content replaces ``path``."""
        path = os.fspath(path)
        existed = os.path.lexists(path)
        f, tmp = temp_beside(path, suffix)
        self._files.append([f, tmp, path, existed])
        return f

    def write(self, path, fill):
        """``fill(file)`` writes the content of ``path`` (added before); its OSErrors name ``path``."""
        path = os.fspath(path)
        f, tmp = next((e[0], e[1]) for e in self._files if e[2] == path)
        try:
            fill(f)
        except OSError as exc:
            raise _about(exc, path, tmp) from exc

    def commit(self):
        for f, tmp, path, _ in self._files:
            _sync(f, tmp, path)
        done = []
        try:
            for entry in self._files:
                _rename(entry[1], entry[2])
                entry[1] = None
                done.append(entry)
        except OSError:
            for _, _, path, existed in done:
                if not existed:
                    remove(path)
            raise
        for directory in sorted({_directory(e[2]) for e in self._files}):
            sync_directory(directory)
        self._files = []

    def discard(self):
        for f, tmp, _, _ in self._files:
            discard(f, tmp)
        self._files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


@contextlib.contextmanager
def replacing(path, suffix=".tmp"):
    """A context manager: the file (binary) whose content replaces ``path`` when the block ends
    without an error; after an error the target is as it was. Errors of writing the file name
    ``path``."""
    with Batch() as batch:
        f = batch.add(path, suffix)
        try:
            yield f
        except OSError as exc:
            raise _about(exc, path) from exc
        batch.commit()


def write_file(path, data):
    """Replace ``path`` atomically with the bytes ``data``."""
    with replacing(path) as f:
        f.write(data)
