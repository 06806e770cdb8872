"""A disk cache of preprocessed windows, keyed on the raw files' contents and the preprocessing.

Reading EDF files, filtering and resampling takes most of a site's loading
time; the result only depends on the raw files, the :class:`PreprocessSpec`
and the loader's own choices (labels, windowing). :class:`WindowCache` stores a
:class:`~fedeeg.data.base.WindowSet` per key as memory-mapped ``.npy`` arrays
plus a JSON manifest::

    ROOT/windows/KEY/X.npy          float32, (n_windows, n_chans, n_times)
    ROOT/windows/KEY/y.npy          int64, (n_windows,)
    ROOT/windows/KEY/subject.npy    str, (n_windows,)
    ROOT/windows/KEY/manifest.json  written last: key material, shapes, dtypes, sha256 of each array
    ROOT/file-hashes.json           memo of raw files' sha256 by (path, size, mtime_ns, inode)

The key is the sha256 of the cache format version, the spec, the caller's
extra key material and, for every raw file, its relative path, size and
content sha256: a changed file or spec is another key (a miss), never a stale
hit. An entry is written into a temporary folder next to its final place,
fsynced, the manifest last, then renamed into place, so a killed write never
leaves a folder that :meth:`WindowCache.load` accepts. Nothing here leaves the
site: the cache lives on the site's own disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .._hashing import sha256_file as file_sha256
from .base import WindowSet
from .preprocessing import PreprocessSpec

__all__ = ["CACHE_FORMAT_VERSION", "WindowCache", "default_cache_dir", "file_sha256"]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout and of the key material; part of every key.
CACHE_FORMAT_VERSION = 1

_FORMAT = "fedeeg-window-cache"
_MANIFEST = "manifest.json"
_HASH_INDEX = "file-hashes.json"
_ARRAYS = ("X", "y", "subject")
_KEY_RE = re.compile(r"[0-9a-f]{64}")
#: A temporary folder older than this is abandoned whoever wrote it (s).
_STALE_SECONDS = 3600.0
#: A memoised file hash is trusted only if the file was unmodified this long
#: before it was hashed (file times are coarse: a quick rewrite could keep the mtime).
_RACY_NS = 2_000_000_000


def default_cache_dir() -> Path:
    """Where FedEEG caches preprocessed windows by default.

    Returns
    -------
    path : Path
        ``$FEDEEG_CACHE_DIR`` when set (and not empty), else ``~/.cache/fedeeg``.
        Not created.
    """
    env = os.environ.get("FEDEEG_CACHE_DIR", "")
    return Path(env).expanduser() if env.strip() else Path("~/.cache/fedeeg").expanduser()


def _canonical_json(obj, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what} must be JSON-serialisable (dicts, lists, str, finite numbers, bool, None), got {obj!r}: {err}."
        ) from None


def _fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename or a new file in it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


class WindowCache:
    """Preprocessed windows on disk, one entry per key.

    Parameters
    ----------
    root : path-like
        The cache folder (created on the first store), e.g. :func:`default_cache_dir`.
    memoise_hashes : bool
        Keep the raw files' content hashes in ``ROOT/file-hashes.json``, keyed
        by (absolute path, size, mtime_ns, inode), so that computing a key a
        second time does not read the files again. A file modified within 2 s
        before it was hashed is hashed again next time.

    Examples
    --------
    >>> cache = WindowCache(default_cache_dir())  # doctest: +SKIP
    >>> key = cache.key(["Subject04_1.edf", "Subject04_2.edf"], spec, {"labels": ["rest", "task"]})  # doctest: +SKIP
    >>> windows = cache.load(key)  # doctest: +SKIP
    >>> if windows is None:  # doctest: +SKIP
    ...     windows = compute()
    ...     cache.store(key, windows, {"subject": "Subject04"})
    """

    def __init__(self, root, *, memoise_hashes: bool = True) -> None:
        if root is None or str(root) == "":
            raise ValueError(f"root must be the cache folder, got {root!r} instead (see default_cache_dir()).")
        self.root = Path(root).expanduser()
        self.memoise_hashes = bool(memoise_hashes)
        self._hash_index: dict[str, dict] | None = None
        self._materials: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"WindowCache({str(self.root)!r})"

    @property
    def _entries(self) -> Path:
        return self.root / "windows"

    def path(self, key: str) -> Path:
        """The folder of the entry ``key`` (it may not exist)."""
        return self._entries / self._check_key(key)

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"key must be a key from WindowCache.key() (64 lower-case hex digits), got {key!r} instead.")
        return key

    # --- keys ---------------------------------------------------------------------------------

    def _load_hash_index(self) -> dict[str, dict]:
        if self._hash_index is None:
            self._hash_index = {}
            if self.memoise_hashes:
                try:
                    data = json.loads((self.root / _HASH_INDEX).read_text(encoding="utf-8"))
                    if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("files"), dict):
                        self._hash_index = data["files"]
                except (OSError, ValueError):
                    pass
        return self._hash_index

    def _save_hash_index(self) -> None:
        index = self._load_hash_index()
        tmp = self.root / f".{_HASH_INDEX}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": 1, "files": index}), encoding="utf-8")
            os.replace(tmp, self.root / _HASH_INDEX)
        except OSError as err:  # a read-only cache still works, only slower
            logger.debug("Could not write the file-hash memo in %s: %s", self.root, err)
            tmp.unlink(missing_ok=True)

    def _file_hash(self, path: Path) -> tuple[int, str, bool]:
        """(size, sha256, computed now) of a file, using the memo when it can be trusted."""
        st = path.stat()
        entry = self._load_hash_index().get(str(path)) if self.memoise_hashes else None
        if (
            entry is not None
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and entry.get("ino") == st.st_ino
            and entry.get("hashed_at_ns", 0) - st.st_mtime_ns > _RACY_NS
            and isinstance(entry.get("sha256"), str)
        ):
            return st.st_size, entry["sha256"], False
        hashed_at = time.time_ns()
        digest = file_sha256(path)
        if self.memoise_hashes:
            self._load_hash_index()[str(path)] = {
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": digest, "hashed_at_ns": hashed_at,
            }  # fmt: skip
        return st.st_size, digest, True

    def key_material(self, files: Iterable, spec: PreprocessSpec, extra=None, *, base=None) -> dict:
        """What :meth:`key` hashes, as a JSON-ready dict.

        Parameters
        ----------
        files : iterable of path-like
            The raw files the windows come from, in a fixed order.
        spec : PreprocessSpec
            The preprocessing.
        extra : dict | list | str | None
            Anything else the windows depend on (label mapping, windowing, the
            loader's version); must be JSON-serialisable.
        base : path-like | None
            Folder the file paths are taken relative to (default: the common
            folder of the files), so a moved dataset keeps its keys.

        Returns
        -------
        material : dict
            ``format_version``, ``spec``, ``extra`` and ``files`` (a list of
            ``{"path", "size", "sha256"}``).
        """
        if not isinstance(spec, PreprocessSpec):
            raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__} instead.")
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        paths = [Path(f).expanduser().resolve() for f in files]
        if not paths:
            raise ValueError("files is empty: a cache key needs the raw files the windows come from.")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Cannot compute a cache key: no such file(s) {missing}.")
        _canonical_json(extra, "extra")
        base = Path(base).expanduser().resolve() if base is not None else Path(os.path.commonpath([p.parent for p in paths]))
        entries, computed = [], False
        for p in paths:
            size, digest, now = self._file_hash(p)
            computed |= now
            rel = os.path.relpath(p, base)
            entries.append({"path": Path(rel).as_posix(), "size": size, "sha256": digest})
        if computed and self.memoise_hashes:
            self._save_hash_index()
        return {"format_version": CACHE_FORMAT_VERSION, "spec": spec.to_dict(), "extra": extra, "files": entries}

    def key(self, files: Iterable, spec: PreprocessSpec, extra=None, *, base=None) -> str:
        """The cache key of windows made from ``files`` with ``spec``.

        sha256 (hex) of :meth:`key_material` as canonical JSON. See
        :meth:`key_material` for the parameters. A changed file content, file
        name, spec or ``extra`` gives another key.

        Returns
        -------
        key : str
            64 hex digits.
        """
        material = self.key_material(files, spec, extra, base=base)
        key = hashlib.sha256(_canonical_json(material, "extra").encode("utf-8")).hexdigest()
        self._materials[key] = material
        return key

    # --- load ---------------------------------------------------------------------------------

    def _invalid(self, folder: Path, why: str, quiet: bool) -> None:
        if not quiet:
            logger.warning("Ignoring the cache entry %s: %s. It will be recomputed and replaced.", folder, why)

    def _read(self, key: str, *, verify: bool, quiet: bool) -> WindowSet | None:
        folder = self.path(key)
        if not folder.is_dir():
            return None
        try:
            manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._invalid(folder, "no manifest (an interrupted write?)", quiet)
            return None
        except (OSError, ValueError) as err:
            self._invalid(folder, f"unreadable manifest ({type(err).__name__}: {err})", quiet)
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            self._invalid(folder, "not a FedEEG window-cache manifest", quiet)
            return None
        if manifest.get("format_version") != CACHE_FORMAT_VERSION:
            self._invalid(folder, f"format version {manifest.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}", quiet)
            return None
        if manifest.get("key") != key:
            self._invalid(folder, f"the manifest's key {manifest.get('key')!r} is not the folder's", quiet)
            return None
        arrays = {}
        try:
            for name in _ARRAYS:
                entry = manifest["arrays"][name]
                fname = folder / entry["file"]
                if Path(entry["file"]).name != entry["file"]:
                    raise ValueError(f"array file name {entry['file']!r} is not a plain name")
                size = fname.stat().st_size
                if size != entry["nbytes"]:
                    why = f"{entry['file']} has {size} bytes, the manifest says {entry['nbytes']} (truncated?)"
                    self._invalid(folder, why, quiet)
                    return None
                if verify and file_sha256(fname) != entry["sha256"]:
                    self._invalid(folder, f"{entry['file']} does not match its sha256 in the manifest", quiet)
                    return None
                empty = 0 in entry["shape"]  # numpy cannot memory-map an empty array
                arr = np.load(fname, mmap_mode=None if empty else "r", allow_pickle=False)
                if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
                    got, expected = f"{arr.dtype.str} {list(arr.shape)}", f"{entry['dtype']} {entry['shape']}"
                    self._invalid(folder, f"{entry['file']} holds {got}, the manifest says {expected}", quiet)
                    return None
                arrays[name] = arr
            windows = WindowSet(
                arrays["X"], arrays["y"], arrays["subject"], manifest["ch_names"], float(manifest["sfreq"]), manifest["label_names"]
            )  # fmt: skip
        except (OSError, KeyError, TypeError, ValueError) as err:
            self._invalid(folder, f"{type(err).__name__}: {err}", quiet)
            return None
        return windows

    def load(self, key: str, *, verify: bool = False) -> WindowSet | None:
        """The windows stored under ``key``, or None.

        Parameters
        ----------
        key : str
            From :meth:`key`.
        verify : bool
            Also check every array file against its sha256 in the manifest
            (reads the files in full). By default only the manifest, the file
            sizes, shapes and dtypes are checked.

        Returns
        -------
        windows : WindowSet | None
            ``X`` (n_windows, n_chans, n_times), ``y`` and ``subject`` are
            read-only memory maps of the cached files. None when there is no
            entry or it is invalid (incomplete, truncated, altered, another
            format version); an invalid entry is logged as a warning and is
            replaced by the next :meth:`store`.
        """
        windows = self._read(self._check_key(key), verify=verify, quiet=False)
        logger.debug("Window cache %s: %s %s.", self.root, "hit" if windows is not None else "miss", key[:12])
        return windows

    # --- store --------------------------------------------------------------------------------

    def _clean_stale(self) -> None:
        """Remove temporary folders left by writers that died (same host, dead pid) or are over an hour old."""
        try:
            candidates = [p for p in self._entries.iterdir() if p.name.startswith((".tmp.", ".trash."))]
        except OSError:
            return
        host, now = _host_tag(), time.time()
        for folder in candidates:
            parts = folder.name.split(".")  # "", "tmp", host, pid, token
            dead = len(parts) == 5 and parts[2] == host and parts[3].isdigit() and not _pid_alive(int(parts[3]))
            try:
                old = now - folder.stat().st_mtime > _STALE_SECONDS
            except OSError:
                continue
            if dead or old:
                logger.info("Window cache: removing the abandoned temporary folder %s.", folder)
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _write_array(fname: Path, arr: np.ndarray) -> dict:
        with open(fname, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return {
            "file": fname.name,
            "shape": list(arr.shape),
            "dtype": arr.dtype.str,
            "nbytes": fname.stat().st_size,
            "sha256": file_sha256(fname),
        }

    @staticmethod
    def _write_manifest(fname: Path, manifest: dict) -> None:
        with open(fname, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())

    def store(self, key: str, windows: WindowSet, meta: dict | None = None) -> Path:
        """Store windows under ``key``, atomically.

        The arrays and then the manifest are written and fsynced in a
        temporary folder beside the entry, which is then renamed into place; a
        write that dies half-way leaves only a temporary folder, which
        :meth:`load` never reads and a later store removes. An existing valid
        entry with the same key is kept (same key, same content); an invalid
        one is replaced.

        Parameters
        ----------
        key : str
            From :meth:`key` (its key material goes into the manifest).
        windows : WindowSet
            ``X`` (n_windows, n_chans, n_times) is stored as float32.
        meta : dict | None
            JSON-serialisable notes kept in the manifest (e.g. the subject).

        Returns
        -------
        path : Path
            The entry's folder.
        """
        self._check_key(key)
        if not isinstance(windows, WindowSet):
            raise TypeError(f"windows must be a WindowSet, got {type(windows).__name__} instead.")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict or None, got {type(meta).__name__} instead.")
        _canonical_json(meta, "meta")
        self._entries.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        final = self._entries / key
        tmp = self._entries / f".tmp.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            arrays = {
                "X": self._write_array(tmp / "X.npy", np.ascontiguousarray(windows.X, dtype=np.float32)),
                "y": self._write_array(tmp / "y.npy", np.ascontiguousarray(windows.y, dtype=np.int64)),
                "subject": self._write_array(tmp / "subject.npy", np.ascontiguousarray(windows.subject.astype(str))),
            }
            from .. import __version__

            manifest = {
                "format": _FORMAT,
                "format_version": CACHE_FORMAT_VERSION,
                "key": key,
                "key_material": self._materials.get(key),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "fedeeg_version": __version__,
                "n_windows": windows.n_windows,
                "ch_names": list(windows.ch_names),
                "sfreq": float(windows.sfreq),
                "label_names": list(windows.label_names),
                "arrays": arrays,
                "meta": meta,
            }
            self._write_manifest(tmp / _MANIFEST, manifest)  # last: marks the folder complete
            _fsync_dir(tmp)
            self._publish(key, tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self._entries)
        logger.debug("Window cache %s: stored %s (%d windows).", self.root, key[:12], windows.n_windows)
        return final

    def _publish(self, key: str, tmp: Path, final: Path) -> None:
        try:
            os.replace(tmp, final)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        if self._read(key, verify=True, quiet=True) is not None:  # another writer stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = self._entries / f".trash.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
