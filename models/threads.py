"""Fix the number of CPU threads every framework uses.

Call ``set_threads(n)`` as early as possible — before torch / tensorflow / jax are
imported — because:

* XLA (JAX) reads ``XLA_FLAGS`` once, when its CPU client starts; for ``n == 1`` we set
  ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``.  After the client
  started it cannot be changed (``thread_info()['jax_configured_before_init']`` says so).
* TensorFlow honours ``TF_NUM_INTRAOP_THREADS``/``TF_NUM_INTEROP_THREADS`` and
  ``tf.config.threading`` only before its runtime is initialised.
* PyTorch's intra-op count can be changed any time (``torch.set_num_threads``), its
  inter-op count only before the first parallel work.
* OpenMP/MKL/OpenBLAS read their variables when loaded.

* XLA:CPU (jax 0.10) does NOT honour a thread limit: its thunk executor runs independent
  operations concurrently on a pool sized by the CPUs the process may use (measured: ~1.75
  cores busy at "1 thread" on 2 cores).  The only reliable limit is CPU affinity, set
  before JAX starts: ``set_threads(n, pin=True)`` restricts the process to ``n`` CPUs
  (``os.sched_setaffinity``); the benchmark and single-thread timings use it.

It is safe to call again; what could not be applied any more is reported, not raised.
Thread counts are recorded in every training metrics dict (``thread_info``).
"""
from __future__ import annotations

import os
import sys

_STATE: dict = {"requested": None, "jax_late": False, "tf_late": False}

_XLA_ONE = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def _set_xla_flags(n: int) -> None:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_cpu_multi_thread_eigen")
             and not f.startswith("intra_op_parallelism_threads")]
    if n == 1:
        flags += list(_XLA_ONE)
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
    else:
        os.environ.pop("XLA_FLAGS", None)


def _jax_started() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    if xb is None:
        return False
    backends = getattr(xb, "_backends", None)
    return bool(backends)


def set_threads(n: int | None, pin: bool | list[int] = False) -> dict:
    """Limit every framework to ``n`` threads (``None``/0: leave defaults). ``pin=True``
    also restricts the process to the last ``n`` allowed CPUs (or to the CPUs listed).
    Returns ``thread_info()``."""
    if not n:
        return thread_info()
    n = int(n)
    _STATE["requested"] = n
    if pin:
        allowed = sorted(os.sched_getaffinity(0))
        cpus = list(pin) if isinstance(pin, (list, tuple)) else allowed[-n:]
        os.sched_setaffinity(0, set(cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(n)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1" if n == 1 else "2"
    _set_xla_flags(n)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1 if n == 1 else 2)
        except RuntimeError:
            pass  # already started: intra-op count is what matters
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(1 if n == 1 else 2)
        except RuntimeError:
            _STATE["tf_late"] = True
    if _jax_started():
        _STATE["jax_late"] = True
    return thread_info()


def thread_info() -> dict:
    """Thread settings as they are now (for metrics / benchmark output)."""
    info: dict = {"requested": _STATE["requested"],
                  "cpu_affinity": sorted(os.sched_getaffinity(0)),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if "torch" in sys.modules:
        import torch

        info["torch_intra_op"] = torch.get_num_threads()
        info["torch_inter_op"] = torch.get_num_interop_threads()
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        info["tf_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
        info["tf_inter_op"] = tf.config.threading.get_inter_op_parallelism_threads()
        info["tf_configured_too_late"] = _STATE["tf_late"]
    if "jax" in sys.modules:
        info["jax_configured_too_late"] = _STATE["jax_late"]
    return info
