"""Our own C sources, built with the system C compiler on first use into the user's cache.

A library is keyed by its source, the compiler's version, the CPU (model and flags: another
machine gets its own build) and the flags, and installed atomically, so processes building at
once each find a whole file. No compiler, or a build that fails: None, logged, and the caller
keeps its Python or torch path. Only sources from the installed package are compiled, nothing
from the network. Used by ``kernels`` (compute) and ``collective.native`` (the data plane), which
is why it sits below both.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _cpu_key() -> str:
    flags = model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not flags and line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
            elif not model and line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


def _cache_dir() -> Path:
    root = os.environ.get("EDGEMESH_KERNEL_CACHE")
    if root:
        return Path(root)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgemesh")) / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def compile_library(source: Path, stem: str, flags: list[str]) -> ctypes.CDLL | None:
    """``source`` built with the system C compiler into the cache (keyed by the source, the
    compiler, the CPU and the flags) and loaded; None when there is no compiler or the build
    fails (logged: the callers keep their Python or torch paths)."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: %s runs without native code (slower)", stem)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    src = source.read_bytes()
    flags = [*flags, "-shared", "-fPIC", "-std=c11"]
    key = hashlib.sha256(b"\0".join([src, version.encode(), _cpu_key().encode(), " ".join(flags).encode()]))
    out = _cache_dir() / f"{stem}-{key.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                log.warning("building %s failed (%s); running without it:\n%s", source.name, cc, res.stderr[-2000:])
                return None
            os.replace(tmp, out)  # atomic: processes building at once each install a whole file
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("building %s failed (%s); running without it", source.name, exc)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(out))
    except OSError as exc:
        log.warning("loading %s failed (%s); running without it", out, exc)
        return None
