"""Uniform read access to named arrays in .npz, .h5/.hdf5, .mat (v5 and v7.3) files and in
directories of .npy files, with errors that name the file and the key.

MATLAB conventions are undone here, so callers see the arrays as MATLAB shows them:
v7.3 files are HDF5 written column-major, so h5py returns every array transposed; this module
transposes back, dereferences cell arrays into object arrays and rebuilds sparse matrices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from ..errors import DataFileError, MissingKeyError

FORMATS = ("npz", "h5", "mat", "dir")
_EXTENSIONS = {".npz": "npz", ".h5": "h5", ".hdf5": "h5", ".mat": "mat"}


def check_path(path: str | os.PathLike) -> str:
    """Return `path` as a str, or raise FileNotFoundError naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def format_of(path: str) -> str:
    """"dir" for a directory, else the format implied by the extension."""
    if os.path.isdir(path):
        return "dir"
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"{path}: cannot tell the format from the extension {ext!r}; expected one of "
            f"{', '.join(sorted(_EXTENSIONS))} or a directory of .npy files"
        )
    return _EXTENSIONS[ext]


class ArrayFile:
    """Read-only mapping of key -> array for one data file; use as a context manager.

    Args:
        path: the file (or, for fmt "dir", a directory holding one `{key}.npy` per key).
        fmt: "npz", "h5", "mat" or "dir"; inferred from the path when None.

    Items are numpy arrays; for .mat files also object arrays (cells) and scipy.sparse matrices.
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None):
        self.path = check_path(path)
        self.fmt = format_of(self.path) if fmt is None else fmt
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown file format {self.fmt!r}; valid: {', '.join(FORMATS)}")
        self._handle = None
        self._mat: dict | None = None
        with self.reading():
            self._keys = self._open()

    def _open(self) -> list[str]:
        if self.fmt == "npz":
            self._handle = np.load(self.path, allow_pickle=False)
            if not isinstance(self._handle, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            return list(self._handle.files)
        if self.fmt == "dir":
            names = sorted(n for n in os.listdir(self.path) if n.endswith(".npy"))
            return [n[: -len(".npy")] for n in names]
        import h5py

        if self.fmt == "h5" or h5py.is_hdf5(self.path):
            self._handle = h5py.File(self.path, "r")
            return [k for k in self._handle.keys() if not k.startswith("#")]
        import scipy.io

        return [name for name, _, _ in scipy.io.whosmat(self.path)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise MissingKeyError(
                f"{self.path}: missing key {key!r}; keys present: {', '.join(self._keys) or '(none)'}"
            )
        with self.reading(key):
            if self.fmt == "npz":
                check_npz_member(self._handle.zip, key + ".npy", f"cannot read key {key!r} of {self.path}")
                return self._handle[key]
            if self.fmt == "dir":
                return load_npy(os.path.join(self.path, key + ".npy"), f"cannot read key {key!r} of {self.path}")
            if self.fmt == "h5":
                return self._handle[key][()]
            if self._handle is not None:
                return _from_matlab_h5(self._handle, self._handle[key])
            if self._mat is None:
                import scipy.io

                self._mat = scipy.io.loadmat(self.path)
            return self._mat[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of the array under `key`. HDF5 (and MATLAB v7.3), .npz and .npy files answer
        from the array's header without reading its data; a v5 .mat file is read whole."""
        if key in self._keys and self.fmt in ("h5", "npz", "dir"):
            with self.reading(key):
                if self.fmt == "h5":
                    return tuple(self._handle[key].shape)
                if self.fmt == "npz":
                    with self._handle.zip.open(key + ".npy") as member:
                        return _npy_shape(member)
                with open(os.path.join(self.path, key + ".npy"), "rb") as member:
                    return _npy_shape(member)
        if self.fmt == "mat" and self._handle is not None and key in self._keys:
            with self.reading(key):  # v7.3: h5py holds the shape, transposed (MATLAB is column-major)
                node = self._handle[key]
                if _plain_matlab_array(node):
                    return tuple(reversed(node.shape))
        return tuple(np.shape(self[key]))

    def first_present(self, candidates: tuple[str, ...], what: str) -> str:
        """The first of `candidates` present in the file, else MissingKeyError naming them."""
        for key in candidates:
            if key in self._keys:
                return key
        raise MissingKeyError(
            f"{self.path}: no {what} key (looked for {', '.join(candidates)}); keys present: "
            f"{', '.join(self._keys) or '(none)'}"
        )

    @contextlib.contextmanager
    def reading(self, key: str | None = None) -> Iterator[None]:
        """Turn any failure to decode the file into a ValueError naming the file (and key)."""
        try:
            yield
        except (MissingKeyError, DataFileError, FileNotFoundError, MemoryError):
            raise
        except Exception as exc:
            what = f"key {key!r} of " if key else ""
            raise ValueError(
                f"cannot read {what}{self.path} as a {self.fmt} file (corrupt or wrong format?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ArrayFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextlib.contextmanager
def naming_file(path: str) -> Iterator[None]:
    """Prefix ValueErrors raised while building a Dataset from `path` with the path."""
    try:
        yield
    except ValueError as exc:
        if path in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


def dense(value, where: str) -> np.ndarray:
    """A 2-D numeric array from a dense array or a scipy.sparse matrix."""
    import scipy.sparse

    if scipy.sparse.issparse(value):
        return value.toarray()
    value = np.asarray(value)
    if value.dtype == object:
        raise ValueError(f"{where}: expected a numeric matrix, got a cell/object array")
    return value


def class_ids(value, where: str) -> np.ndarray:
    """(n,) int64 ids from a vector stored as (n,), (n, 1) or (1, n), dense or sparse."""
    y = dense(value, where)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"{where}: expected a vector of class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) and y.dtype != np.bool_:
        raise ValueError(f"{where}: class ids have non-numeric dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (
        np.isfinite(y).all() and (y == np.round(y)).all()
    ):
        raise ValueError(f"{where}: class ids must be integers")
    return y.astype(np.int64)


def strings(value) -> list[str]:
    """A list of str from a unicode/bytes array, a MATLAB char matrix or a cell of strings."""
    if isinstance(value, (str, bytes)):
        value = [value]
    out = []
    for item in np.asarray(value, dtype=object).reshape(-1):
        if isinstance(item, np.ndarray):
            item = "".join(strings(item)) if item.dtype.kind in "OUS" else str(item)
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        out.append(str(item).rstrip())
    return out


# Deflate's largest ratio of output to input bytes (a stream of one repeated byte): a zip member
# that claims more than this many bytes per compressed byte lies about its size.
_DEFLATE_MAX_RATIO = 1032


def check_npy_size(stream, size: int, where: str) -> None:
    """Refuse a .npy whose header declares more data than the `size` bytes it has (a crafted
    or truncated file would otherwise make numpy allocate the declared size first). `stream` is
    at the start of the .npy; DataFileError names `where`."""
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    except ValueError as exc:
        raise DataFileError(f"{where}: not a readable .npy array ({exc})") from None
    if dtype.hasobject:
        return  # refused by allow_pickle=False, with numpy's own message
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = size - stream.tell()
    if need > have:
        raise DataFileError(f"{where}: the header declares {dtype} data of shape {tuple(shape)} ({need} bytes), "
                            f"but the file holds {max(have, 0)} bytes of data")


def load_npy(path: str, where: str | None = None, mmap_mode: str | None = None) -> np.ndarray:
    """The array of the .npy file `path` (memory-mapped with `mmap_mode`), its header's declared
    size checked against the file's before anything is allocated; no pickles. Errors are one
    DataFileError naming `where` (default: the path)."""
    where = where or path
    try:
        with open(path, "rb") as f:
            check_npy_size(f, os.fstat(f.fileno()).st_size, where)
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except IsADirectoryError:
        raise DataFileError(f"{where} is a directory, not a .npy file") from None
    except (ValueError, EOFError) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{where}: not a readable .npy array ({exc})") from None


def check_npz_member(archive, name: str, where: str) -> None:
    """Refuse the .npy member `name` of an open .npz (zipfile) whose header declares more data
    than the member holds, or whose recorded size is more than its compressed bytes can hold
    (the archive's directory is as easy to craft as the header)."""
    import zipfile

    info = archive.getinfo(name)
    try:
        room = os.fstat(archive.fp.fileno()).st_size - info.header_offset
    except (AttributeError, OSError, ValueError):  # an archive not backed by a file
        room = info.compress_size
    most = {zipfile.ZIP_STORED: info.compress_size,
            zipfile.ZIP_DEFLATED: _DEFLATE_MAX_RATIO * info.compress_size + 64}.get(info.compress_type, info.file_size)
    if info.compress_size > room or info.file_size > most:
        raise DataFileError(f"{where}: the archive records {info.file_size} bytes in {info.compress_size} "
                            f"compressed bytes, more than they can hold (corrupt or crafted)")
    with archive.open(name) as member:
        check_npy_size(member, info.file_size, where)


def _npy_shape(stream) -> tuple[int, ...]:
    """The shape in a .npy header, read from the start of `stream` (the data is not read)."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = read(stream)
    return tuple(shape)


def _plain_matlab_array(node) -> bool:
    """A v7.3 node that is a numeric matrix as stored (not a cell, string, sparse or empty)."""
    import h5py

    matlab_class = node.attrs.get("MATLAB_class", b"")
    return (isinstance(node, h5py.Dataset) and node.dtype != h5py.ref_dtype
            and matlab_class not in (b"char", "char") and not node.attrs.get("MATLAB_empty", 0))


def _from_matlab_h5(f, node):
    """Convert one node of a MATLAB v7.3 file to what scipy.io.loadmat would return."""
    import h5py
    import scipy.sparse

    attrs = node.attrs
    matlab_class = attrs.get("MATLAB_class", b"")
    if isinstance(matlab_class, bytes):
        matlab_class = matlab_class.decode()
    if isinstance(node, h5py.Group):
        if "MATLAB_sparse" in attrs:
            jc = node["jc"][()]
            data = node["data"][()] if "data" in node else np.zeros(0)
            ir = node["ir"][()] if "ir" in node else np.zeros(0, np.int64)
            shape = (int(attrs["MATLAB_sparse"]), jc.size - 1)
            return scipy.sparse.csc_matrix((data, ir, jc), shape=shape)
        raise ValueError(f"MATLAB {matlab_class or 'struct'} {node.name!r} is not supported")
    if attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    value = node[()]
    if node.dtype == h5py.ref_dtype:
        cells = np.empty(value.shape, dtype=object)
        for index, ref in np.ndenumerate(value):
            cells[index] = _from_matlab_h5(f, f[ref])
        return cells.T
    value = np.asarray(value).T
    if matlab_class == "char":
        return np.array(["".join(map(chr, row)) for row in np.atleast_2d(value)])
    return value
