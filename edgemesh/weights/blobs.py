"""A node's cache of received weight slices, addressed by sha256.

Workers fetch only the slices they need; a file lands under its hash only after the hash
was checked, so a cached blob is always whole and right.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgemesh.weights.store import IntegrityError


class BlobCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.safetensors"

    def has(self, sha256: str, nbytes: int) -> bool:
        p = self.path(sha256)
        return p.is_file() and p.stat().st_size == nbytes

    def writer(self, sha256: str) -> BlobWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return BlobWriter(self.path(sha256), sha256)


class BlobWriter:
    """Append chunks, then ``commit()`` (hash checked) or ``abort()``."""

    def __init__(self, final: Path, sha256: str) -> None:
        self.final = final
        self.sha256 = sha256
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.part")
        self._fh = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self.written = 0

    def write(self, chunk: memoryview | bytes) -> None:
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.written += len(chunk)

    def commit(self) -> Path:
        self._fh.close()
        got = self._hash.hexdigest()
        if got != self.sha256:
            self.tmp.unlink(missing_ok=True)
            raise IntegrityError(f"received slice hashes to {got[:16]}…, expected {self.sha256[:16]}…")
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)
