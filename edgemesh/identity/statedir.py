"""A node's state directory: identity, cluster membership secret, cached view, daemon record.

Everything secret is written 0600 inside a 0700 directory, atomically (write + rename), so a
crash never leaves a half-written key behind.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack

from edgemesh.config import edgemesh_home
from edgemesh.errors import StateDirError
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.token import SECRET_BYTES


def default_state_dir() -> Path:
    return edgemesh_home() / "node"


@dataclass(frozen=True)
class ClusterInfo:
    cluster_id: str
    root: str  # node id of the founding member; its admission is self-signed
    secret: bytes
    # The rotation that set ``secret`` (epoch 0: the secret the cluster was created with), kept
    # so the member can hand the signed rotation on to members that have not heard of it.
    secret_epoch: int = 0
    rotated_by: str = ""
    rotation_sig: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"cluster_id": self.cluster_id, "root": self.root, "secret": self.secret.hex(),
                "secret_epoch": self.secret_epoch, "rotated_by": self.rotated_by,
                "rotation_sig": self.rotation_sig.hex()}

    def rotated(self, secret: bytes, epoch: int, by: str, sig: bytes) -> ClusterInfo:
        return replace(self, secret=secret, secret_epoch=epoch, rotated_by=by, rotation_sig=sig)


class StateDir:
    IDENTITY = "identity.json"
    CLUSTER = "cluster.json"
    MEMBERS = "members.msgpack"
    DAEMON = "daemon.json"
    LOG = "daemon.log"
    ERROR = "daemon.error"
    CONFIG = "config.toml"

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().absolute()

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- creation and checks -------------------------------------------------
    def ensure(self) -> None:
        """Create the directory (0700) if needed, and check that we can write into it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except PermissionError:
            raise StateDirError(f"cannot create state dir {self.path}: permission denied") from None
        except OSError as exc:
            raise StateDirError(f"cannot create state dir {self.path}: {exc.strerror}") from None
        if not self.path.is_dir():
            raise StateDirError(f"state dir {self.path} exists but is not a directory")
        if not os.access(self.path, os.R_OK | os.W_OK | os.X_OK):
            raise StateDirError(f"state dir {self.path} is not readable and writable by this user")

    def _read_json(self, name: str) -> dict[str, Any] | None:
        p = self.file(name)
        try:
            with open(p, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise StateDirError(f"cannot read {p}: permission denied (run as the user who owns it)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StateDirError(f"{p} is corrupt (not JSON); restore it or start with a new --state-dir") from None
        if not isinstance(data, dict):
            raise StateDirError(f"{p} is corrupt (expected a JSON object)")
        return data

    def _write_json(self, name: str, data: dict[str, Any], secret: bool = False) -> None:
        self._write_bytes(name, json.dumps(data, indent=1, sort_keys=True).encode(), secret)

    def _write_bytes(self, name: str, data: bytes, secret: bool = False) -> None:
        p = self.file(name)
        tmp = p.with_name(f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    # ---- identity ------------------------------------------------------------
    def load_or_create_identity(self, name: str | None = None) -> tuple[NodeKey, str]:
        self.ensure()
        data = self._read_json(self.IDENTITY)
        if data is None:
            key = NodeKey.generate()
            node_name = name or f"node-{key.node_id[:6]}"
            self._write_json(self.IDENTITY, {"version": 1, "seed": key.seed.hex(), "name": node_name}, secret=True)
            return key, node_name
        key, stored_name = self._parse_identity(data)
        if name and name != stored_name:
            data["name"] = name
            self._write_json(self.IDENTITY, data, secret=True)
            stored_name = name
        return key, stored_name

    def load_identity(self) -> tuple[NodeKey, str]:
        data = self._read_json(self.IDENTITY)
        if data is None:
            raise StateDirError(
                f"{self.path} holds no edgemesh node (no {self.IDENTITY}); "
                "run `edgemesh init` or `edgemesh join TOKEN` first, or pass --state-dir"
            )
        return self._parse_identity(data)

    def _parse_identity(self, data: dict[str, Any]) -> tuple[NodeKey, str]:
        try:
            seed = bytes.fromhex(data["seed"])
            if len(seed) != 32:
                raise ValueError
            return NodeKey(seed), str(data["name"])
        except (KeyError, ValueError, TypeError):
            raise StateDirError(f"{self.file(self.IDENTITY)} is corrupt (bad key)") from None

    # ---- cluster -------------------------------------------------------------
    def new_cluster(self, root: str) -> ClusterInfo:
        info = ClusterInfo(cluster_id=secrets.token_hex(8), root=root, secret=secrets.token_bytes(SECRET_BYTES))
        self.save_cluster(info)
        return info

    def save_cluster(self, info: ClusterInfo) -> None:
        self._write_json(self.CLUSTER, info.to_json(), secret=True)

    def load_cluster(self) -> ClusterInfo | None:
        data = self._read_json(self.CLUSTER)
        if data is None:
            return None
        try:
            return ClusterInfo(str(data["cluster_id"]), str(data["root"]), bytes.fromhex(data["secret"]),
                               int(data.get("secret_epoch", 0)), str(data.get("rotated_by", "")),
                               bytes.fromhex(data.get("rotation_sig", "")))
        except (KeyError, ValueError, TypeError, AttributeError):
            raise StateDirError(f"{self.file(self.CLUSTER)} is corrupt") from None

    def require_cluster(self) -> ClusterInfo:
        info = self.load_cluster()
        if info is None:
            raise StateDirError(
                f"the node in {self.path} is not part of a cluster; run `edgemesh init` or `edgemesh join TOKEN`"
            )
        return info

    # ---- replicated view cache ---------------------------------------------
    def save_members(self, records: list[dict[str, Any]], removals: list[dict[str, Any]] | None = None) -> None:
        """The view as msgpack (records and removals hold raw keys and signatures; no secret)."""
        self._write_bytes(self.MEMBERS, msgpack.packb(
            {"saved": time.time(), "records": records, "removals": removals or []}, use_bin_type=True))

    def _load_view(self, field: str) -> list[Any]:
        try:
            data = msgpack.unpackb(self.file(self.MEMBERS).read_bytes(), raw=False, strict_map_key=True)
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return []  # a damaged cache is rebuilt by gossip
        items = data.get(field) if isinstance(data, dict) else None
        return items if isinstance(items, list) else []

    def load_members(self) -> list[Any]:
        """Cached records (still untrusted: the view re-checks every signature on load)."""
        return self._load_view("records")

    def load_removals(self) -> list[Any]:
        """Cached removals (untrusted, like the records)."""
        return self._load_view("removals")

    def forget_cluster(self) -> None:
        """After leaving: drop the cluster secret and view, and replace the node key (keeping the
        name). The cluster refuses the old key for good, so joining again needs a new one."""
        for name in (self.CLUSTER, self.MEMBERS):
            try:
                self.file(name).unlink()
            except FileNotFoundError:
                pass
        data = self._read_json(self.IDENTITY)
        if data is not None:
            _, name = self._parse_identity(data)
            key = NodeKey.generate()
            self._write_json(self.IDENTITY, {"version": 1, "seed": key.seed.hex(), "name": name}, secret=True)

    # ---- how the daemon was last started (so `edgemesh start` needs no flags) ----
    SETTINGS = "settings.json"

    def save_settings(self, settings: dict[str, Any]) -> None:
        # 0600: it may hold a swarm backend's API key (`edgemesh swarm config --api-key`).
        self._write_json(self.SETTINGS, settings, secret=True)

    def load_settings(self) -> dict[str, Any]:
        return self._read_json(self.SETTINGS) or {}

    # ---- daemon record -------------------------------------------------------
    def save_daemon(self, record: dict[str, Any]) -> None:
        self._write_json(self.DAEMON, record)

    def load_daemon(self) -> dict[str, Any] | None:
        return self._read_json(self.DAEMON)

    def clear_daemon(self) -> None:
        try:
            self.file(self.DAEMON).unlink()
        except FileNotFoundError:
            pass
