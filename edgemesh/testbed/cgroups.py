"""Per-device CPU, memory and disk-read caps with cgroups: v1 (this machine) or v2 (where unified).

Every device gets a cgroup, capped or not, so that every process started in it can be found
(and ended by pid) at teardown. Layout: ``<controller root>/edgemesh-<prefix>/<device>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgemesh.testbed.naming import Names
from edgemesh.testbed.scenario import Device
from edgemesh.testbed.steps import Kind, MakeDir, Resource, Step, Write

# A short enforcement period makes a capped device behave like a slower CPU rather than a fast
# one that stalls: at the kernel default of 100 ms a 0.5-core device runs 50 ms, then freezes
# 50 ms, and a tensor-parallel group in lockstep waits on whoever is frozen. Measured here, 4
# ranks at 0.5 core doing 1 ms of work per barrier step: 3.20 ms/step at 100 ms, 2.96 at 10 ms
# (ideal 2.0; the rest is the barrier itself). 10 ms keeps the quota (5 ms) at the kernel's
# bandwidth slice, so the cap stays accurate.
CFS_PERIOD_US = 10_000


@dataclass(frozen=True)
class CgroupLayout:
    version: int  # 1 or 2
    memory_root: Path  # v1: the memory hierarchy; v2: the unified root
    cpu_root: Path
    io_root: Path | None = None  # v1: the blkio hierarchy; v2: the unified root with ``io``; None = no disk caps

    @classmethod
    def detect(cls, base: Path = Path("/sys/fs/cgroup")) -> CgroupLayout | None:
        if (base / "memory" / "memory.limit_in_bytes").exists() and (base / "cpu" / "cpu.cfs_quota_us").exists():
            blkio = base / "blkio"
            return cls(1, base / "memory", base / "cpu",
                       blkio if (blkio / "blkio.throttle.read_bps_device").exists() else None)
        controllers = base / "cgroup.controllers"
        if controllers.exists():
            available = controllers.read_text().split()
            if "memory" in available and "cpu" in available:
                return cls(2, base, base, base if "io" in available else None)
        return None

    def group_dirs(self, names: Names) -> list[Path]:
        """The per-testbed parent group(s); one per hierarchy."""
        roots = [self.memory_root] if self.version == 2 else [self.memory_root, self.cpu_root]
        if self.version == 1 and self.io_root is not None:
            roots.append(self.io_root)
        return [root / names.cgroup_group for root in roots]

    def device_dirs(self, names: Names, device: str) -> list[Path]:
        return [group / device for group in self.group_dirs(names)]


def backing_disk(path: Path) -> str | None:
    """``MAJ:MIN`` of the whole disk holding ``path`` (throttles apply to disks, not partitions);
    None on tmpfs, overlay and the like, where reads never reach a block device of their own."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    dev = os.stat(p).st_dev
    sys_dir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.major(dev) == 0 or not sys_dir.exists():
        return None
    if (sys_dir / "partition").exists():
        sys_dir = sys_dir.resolve().parent
    try:
        return (sys_dir / "dev").read_text().strip()
    except OSError:
        return None


def read_cap_bytes(dev: Device) -> int | None:
    """The device's disk read cap in bytes/s (profiles give MB/s, 10^6 bytes)."""
    return None if dev.disk_read_mbyte_s is None else int(dev.disk_read_mbyte_s * 1e6)


def cgroup_steps(layout: CgroupLayout, names: Names, devices: tuple[Device, ...], disk: str | None = None) -> list[Step]:
    """``disk`` (``MAJ:MIN`` of the disk under the devices' state dirs, see ``backing_disk``)
    lets devices with a ``disk_read_mbyte_s`` get a read-throughput cap on it."""
    stage = "cgroups"
    steps: list[Step] = []
    io = layout.io_root is not None and disk is not None
    for group in layout.group_dirs(names):
        steps.append(MakeDir(str(group), stage, Resource(Kind.CGROUP, str(group))))
    if layout.version == 2:
        # Controllers must be delegated down the tree before children can use them.
        ctl = "+memory +cpu" + (" +io" if io else "")
        steps.append(Write(str(layout.memory_root / "cgroup.subtree_control"), ctl, stage))
        steps.append(Write(str(layout.group_dirs(names)[0] / "cgroup.subtree_control"), ctl, stage))
    for dev in devices:
        dirs = layout.device_dirs(names, dev.name)
        for d in dirs:
            steps.append(MakeDir(str(d), stage, Resource(Kind.CGROUP, str(d))))
        cap = read_cap_bytes(dev)
        if io and cap is not None:
            # Reads that miss the page cache are throttled; cached ones are memory copies.
            if layout.version == 1:
                steps.append(Write(str(dirs[2] / "blkio.throttle.read_bps_device"), f"{disk} {cap}", stage))
            else:
                steps.append(Write(str(dirs[0] / "io.max"), f"{disk} rbps={cap}", stage))
        if layout.version == 1:
            mem_dir, cpu_dir = dirs[:2]
            if dev.memory_mib is not None:
                steps.append(Write(str(mem_dir / "memory.limit_in_bytes"), str(dev.memory_mib * 1024 * 1024), stage))
                # Without this a capped device would page to swap instead of hitting its limit.
                steps.append(Write(str(mem_dir / "memory.swappiness"), "0", stage))
            if dev.cpus is not None:
                steps.append(Write(str(cpu_dir / "cpu.cfs_period_us"), str(CFS_PERIOD_US), stage))
                steps.append(Write(str(cpu_dir / "cpu.cfs_quota_us"), str(int(dev.cpus * CFS_PERIOD_US)), stage))
        else:
            (d,) = dirs
            if dev.memory_mib is not None:
                steps.append(Write(str(d / "memory.max"), str(dev.memory_mib * 1024 * 1024), stage))
                steps.append(Write(str(d / "memory.swap.max"), "0", stage))
            if dev.cpus is not None:
                steps.append(Write(str(d / "cpu.max"), f"{int(dev.cpus * CFS_PERIOD_US)} {CFS_PERIOD_US}", stage))
    return steps
