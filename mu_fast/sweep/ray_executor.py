"""The Ray executor: actors that each hold one loaded model and take runs of it; records gathered by the driver.

Each actor is a ``mu_fast.sweep.worker.Worker`` (one model at a time, restored between runs) with one GPU when the
cluster has GPUs (``num_gpus=1``; Ray sets the actor's ``CUDA_VISIBLE_DEVICES``) and one CPU otherwise. The driver
(the process that called ``mu_fast.sweep.run``) hands each free actor the next run of the model it holds
(``scheduler.Scheduler``), and appends every record to its store as it arrives, so the store needs no shared file
system and a killed driver loses only the runs in flight. A sequential run is one call of the actor's
``execute_sequence`` with ``num_returns="streaming"`` (a Ray streaming generator): the driver waits on the
generator with ``ray.wait`` and stores each step's record as the actor yields it, so a killed driver loses only the
step in flight. An actor that dies fails its run in flight (a sequence: the step in flight).

On one machine, ``run(spec, executor="ray")`` starts a private local cluster (``ray.init`` with ``workers`` CPUs,
no dashboard) and stops it at the end. That cluster listens on the loopback address only: Ray's servers (GCS,
raylet, object manager, every worker and agent) bind to every interface unless the node's IP is a loopback address,
and on Linux ``ray.init`` turns a loopback ``_node_ip_address`` back into the machine's address unless Ray's
single-machine mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read into ``ray_constants.ENABLE_RAY_CLUSTER``
at import). ``_loopback_only`` sets both around ``ray.init`` (and restores them); a cluster that still comes up on
another address is reported with a warning. On a real cluster::

    # on the head node
    ray start --head --port=6379
    # on every other node (mu_fast and its requirements installed, the same Python, models/data reachable)
    ray start --address=<head-ip>:6379
    # on the head node (or any node with the store's folder): drive the sweep
    python -c "import mu_fast.sweep as s; s.run('specs/paper_table1_sports.yaml', executor='ray', ray_address='auto')"

``ray_address="auto"`` connects to the cluster started with ``ray start`` on this node (or set ``RAY_ADDRESS``);
``workers`` defaults to the cluster's GPU count (else 2). Check the cluster with ``ray status``; stop it with
``ray stop``. Token authentication (Ray 2.60, the version tested; Ray's docs, ray-security/token-auth): the local
cluster of ``ray.init`` has it on by default (a token is generated into ``~/.ray/auth_token``), but ``ray start``
turns it on only when ``RAY_AUTH_MODE=token`` is set or a token already exists (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), and otherwise warns "Token authentication is disabled". Keep it on
with ``export RAY_AUTH_MODE=token`` and ``ray get-auth-token --generate`` on the head before ``ray start --head``, the
same token file (or variables) on every node and on the driver, and never ``RAY_AUTH_MODE=disabled``. Ray's old
``local_mode`` is not used (deprecated in Ray 2.x): tests run a real local cluster on CPUs.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mu_fast.sweep.spec import RunConfig

_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode while the block runs: a local cluster then binds to the loopback address only
    (module docstring). Restores the setting afterwards."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_SINGLE_MACHINE_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = saved_env
        if saved_flag is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class _Actor:
    """Ray actor body: a Worker on this actor's device."""

    def __init__(self, setup: Callable[[], None] | None, threads: int | None):
        from mu_fast.sweep.worker import Worker

        self.worker = Worker(None, setup, threads)

    def execute(self, run_data: dict[str, Any]) -> dict[str, Any]:
        return self.worker.execute(run_data)

    def execute_sequence(self, run_data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Called with ``num_returns="streaming"``: each step's record reaches the driver as it is yielded."""
        from mu_fast.sweep.worker import run_records

        yield from run_records(self.worker, run_data)

    def where(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run_ray(todo: list[RunConfig], sink: Callable[[dict[str, Any]], None],
            on_run_start: Callable[[RunConfig], None] | None = None, workers: int | None = None,
            address: str | None = None, setup: Callable[[], None] | None = None, threads: int | None = None) -> None:
    """Execute ``todo`` on Ray actors; each record goes to ``sink`` (module docstring)."""
    try:
        import ray
    except ImportError as err:
        raise ValueError(f"executor='ray' needs Ray ({err}); pip install 'mu_fast[ray]' or use executor='local'") from None
    from mu_fast.sweep.scheduler import Scheduler
    from mu_fast.sweep.session import error_info
    from mu_fast.sweep.worker import expected_records

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address is not None:
            ray.init(address=address, **kwargs)
        else:
            # workers import mu_fast from where this process does (a source checkout may not be the installed one)
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            with _loopback_only():
                try:
                    ray.init(num_cpus=workers or 2, runtime_env={"env_vars": {"PYTHONPATH": path}},
                             _node_ip_address="127.0.0.1", **kwargs)
                except Exception as err:  # noqa: BLE001 - Ray's start-up errors are many and not the user's fault
                    raise RuntimeError(f"executor='ray' could not start a local Ray cluster: {err}") from err
            node_ip = ray.util.get_node_ip_address()
            if not _is_loopback(node_ip):
                warnings.warn(f"the local Ray cluster listens on {node_ip}, not on the loopback address only; "
                              "other machines that reach it can run code in it", stacklevel=2)
        started = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 2
        count = min(count, len(todo))
        if threads is None and not gpus:
            threads = max(1, int(ray.cluster_resources().get("CPU", count)) // count)
        actor_class = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(_Actor)
        actors = [actor_class.remote(setup, threads) for _ in range(count)]
        scheduler = Scheduler(todo)
        holding: dict[int, str | None] = {i: None for i in range(count)}
        pending: dict[Any, tuple[int, RunConfig, int]] = {}  # ref or streaming generator: (actor, run, records left)

        def hand_out(i: int) -> None:
            run = scheduler.next_for(holding[i])
            if run is None:
                return
            if on_run_start is not None:
                on_run_start(run)
            holding[i] = run.model_key
            data = run.to_dict()
            if run.streams:  # one record per step (or batch member), streamed as each finishes
                waitable = actors[i].execute_sequence.options(num_returns="streaming").remote(data)
            else:
                waitable = actors[i].execute.remote(data)
            pending[waitable] = (i, run, expected_records(data))

        for i in range(count):
            hand_out(i)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            i, run, left = pending.pop(ready)
            lost = run.part(run.parts - left) if run.streams else run  # the step (or run) this record is of
            try:
                record = ray.get(next(ready)) if run.streams else ray.get(ready)
            except Exception as err:  # noqa: BLE001 - an actor that died fails its run; a new one takes its place
                if isinstance(err, StopIteration):
                    err = RuntimeError(f"the actor's unit ended after {run.parts - left} of {run.parts} records "
                                       "without a failed record")
                record = {"format": 1, "run_id": lost.run_id, "config": lost.to_dict(), "status": "failed",
                          "error": {**error_info(err), "stage": "ray actor"}, "timings": {}}
                actors[i] = actor_class.remote(setup, threads)
                holding[i] = None
                left = 1
            sink(record)
            if left > 1 and (record.get("status") == "ok" or not run.ends_on_failure):
                pending[ready] = (i, run, left - 1)  # the sequence's next steps come from the same generator
                continue
            hand_out(i)
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
