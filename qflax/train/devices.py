"""XLA:CPU thread pools for several CPU devices in one process.

XLA:CPU runs every device's part of a jitted step on one intra-op (Eigen) pool, and
sizes it, like its dispatch pool, at ``max(cores, devices)`` threads. An all-reduce
(the gradient sum, sync-BN statistics) holds one pool thread of each device that has
reached it until the last device arrives. With more fake devices than cores
(``JAX_NUM_CPU_DEVICES=8`` on 2 cores) the pool has one thread per device: the first
seven devices wait in the all-reduce on seven threads, the eighth device's convolution
splits into pool tasks and waits for them on the eighth, no thread is left to run
them, and after 40 s XLA aborts the process ("Termination timeout ... Expected 8
threads to join the rendezvous, but only 7 of them arrived on time"). Two threads per
device leave room for both. ``PJRT_NPROC``, read when the CPU backend starts, sets
the size of both pools.
"""

from __future__ import annotations

import os
import re

_FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count[= ](\d+)")


def cpu_device_count(environ=None) -> int:
  """The devices the CPU backend will create: ``jax_num_cpu_devices`` (or
  ``JAX_NUM_CPU_DEVICES``), else ``--xla_force_host_platform_device_count`` in
  ``XLA_FLAGS``, else 1."""
  import jax
  configured = jax.config.jax_num_cpu_devices
  if configured > 0:
    return configured
  match = _FORCED_DEVICES.search((os.environ if environ is None else environ).get("XLA_FLAGS", ""))
  return int(match.group(1)) if match else 1


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_cpu_thread_pools(environ=None, devices: int | None = None) -> int | None:
  """Sets ``PJRT_NPROC`` to two threads per CPU device when the cores are fewer, unless
  ``PJRT_NPROC`` or ``NPROC`` is set already; returns the size it set, or ``None``.

  Call it before the CPU backend starts (the first ``jax.devices()`` or computation);
  afterwards it changes nothing.
  """
  environ = os.environ if environ is None else environ
  devices = cpu_device_count(environ) if devices is None else devices
  if devices < 2 or 2 * devices <= _cores() or "PJRT_NPROC" in environ or "NPROC" in environ:
    return None
  environ["PJRT_NPROC"] = str(2 * devices)
  return 2 * devices
