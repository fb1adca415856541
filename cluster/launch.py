"""Ray's side of a cluster: start or join Ray, place kernels with placement groups, find them again.

Everything here is Ray's own machinery: ``ray start --head`` for a new local cluster, named
detached actors (``llmos-kernel-<id>`` in namespace ``llmos``) that Ray restarts when they die
(``max_restarts``), and one placement group per batch of kernels, ``STRICT_SPREAD`` across
nodes where there are enough of them (one kernel per node), else ``SPREAD``; with ``per_gpu``
each bundle holds one GPU, so Ray gives each kernel its own device (``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

NAMESPACE = "llmos"
ACTOR_PREFIX = "llmos-kernel-"
GROUP_PREFIX = "llmos-kernels-"
HEAD_LOG = "ray-head.log"


def ray_env() -> None:
    """Token authentication on (Ray's default for new clusters), no usage reporting. Ray reads
    these when it is imported, so this module sets them as it is imported itself."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


ray_env()


def start_head(state: Path, num_cpus: int, num_gpus: int | None = None) -> tuple[str, int]:
    """A new single-node Ray cluster (``ray start --head --block``, its own session): its
    address and the pid that stops it (SIGTERM)."""
    from llmos.cluster.actor import free_port
    ray_env()
    port = free_port("127.0.0.1")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
           f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
           f"--object-store-memory={128 << 20}"]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    log = open(state / HEAD_LOG, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = (state / HEAD_LOG).read_text(errors="replace")
        if "Ray runtime started" in text:
            return f"127.0.0.1:{port}", proc.pid
        if proc.poll() is not None:
            raise SystemExit(f"llmos: ray start failed:\n{text[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("llmos: ray start did not come up in 120 s")


def connect(address: str) -> None:
    import ray
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)


def alive_nodes() -> list[dict]:
    import ray
    return [n for n in ray.nodes() if n.get("Alive")]


def find_kernels() -> dict[int, object]:
    """The kernel actors that exist (a front restarting adopts them), by id."""
    import ray
    found = {}
    for name in ray.util.list_named_actors():          # this namespace's (llmos)
        if name.startswith(ACTOR_PREFIX) and name[len(ACTOR_PREFIX):].isdigit():
            try:
                found[int(name[len(ACTOR_PREFIX):])] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:                           # died since it was listed
                continue
    return found


def start_kernels(ids: list[int], root: Path, kernel_args: list[str], front_key: str, cpus: float,
                  per_gpu: bool, free: list | None = None) -> dict[int, tuple[object, tuple]]:
    """Actors for kernels ``ids``: into ``free`` bundles first (``(group, index)`` left by
    drained kernels), the rest into a new placement group. Returns id -> (actor, bundle); the
    constructors run in the background (``info.remote()`` answers when each has booted)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from llmos.cluster.actor import KernelActor
    free = free if free is not None else []
    slots = [free.pop(0) for _ in ids[:len(free)]]
    rest = len(ids) - len(slots)
    if rest:
        bundle = {"CPU": cpus, **({"GPU": 1} if per_gpu else {})}
        strategy = "STRICT_SPREAD" if 1 < rest <= len(alive_nodes()) else "SPREAD"
        pg = placement_group([dict(bundle) for _ in range(rest)], strategy=strategy, lifetime="detached",
                             name=f"{GROUP_PREFIX}{ids[len(slots)]}")
        slots += [(pg, i) for i in range(rest)]
    cls = ray.remote(KernelActor)
    started = {}
    for kid, (pg, index) in zip(ids, slots):
        started[kid] = (cls.options(
            name=f"{ACTOR_PREFIX}{kid}", namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
            max_concurrency=4, num_cpus=cpus, num_gpus=1 if per_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        ).remote(kid, str(root), kernel_args, front_key), (pg, index))
    return started


def remove(actors: dict, groups: bool = True) -> None:
    """Kill the actors for good and (``groups``) free every kernel placement group of the cluster."""
    import ray
    from ray.util import get_placement_group, placement_group_table
    from ray.util.placement_group import remove_placement_group
    for actor in actors.values():
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    for row in placement_group_table().values() if groups else ():
        if str(row.get("name", "")).startswith(GROUP_PREFIX) and row.get("state") != "REMOVED":
            try:
                remove_placement_group(get_placement_group(row["name"]))
            except Exception:
                pass
