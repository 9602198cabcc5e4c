"""Pure planning: who runs which slice, and the predicted memory and ms/token."""

from edgemesh.placement.devices import Device, Link, uniform_devices
from edgemesh.placement.plan import Plan, plan

__all__ = ["Device", "Link", "Plan", "plan", "uniform_devices"]
