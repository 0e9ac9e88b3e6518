"""The launcher: runs `python -m engine serve` for every Replica the database wants running, on this host.

Each pass (`reconcile`, every LAUNCHER_POLL_SECONDS) compares the rows with the processes:
- wanted and absent: adopt the engine an earlier launcher left (pid alive, its command line serves the
  replica's port) or start one on a free port of LAUNCHER_PORT_RANGE, registered as the replica's
  Deployment (disabled until its /health answers 200, then routed to like any replica);
- exited: unregister it at once (healthy = False), restart it after a backoff of 1 s doubling to 30 s;
- an older generation (*restart*): replace it; not wanted any more (*stop*, row deleted): unregister
  it first, then SIGTERM (SIGKILL after 10 s).
Status, pid, port, restarts, the last error and the tail of the engine's log (LAUNCHER_STATE_DIR) are
written on the row for the admin. The engine token lives on the Deployment and reaches the engine in
ENGINE_API_KEY, never on its command line. Run one launcher per host (`manage.py launcher`); runplatform
runs one in-process whose engines die with it (`own_children`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import httpx
from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from . import sources
from .catalog import catalog, check_deployment
from .models import Deployment, Replica, ReplicaState, ReplicaStatus

logger = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
HEALTH_CHECK_EVERY = 10.0  # seconds between health checks of a running engine (liveness: every pass)
LOG_TAIL_BYTES = 4000
MAX_LOG_BYTES = 20 << 20  # a log past this is rotated to .1 when its engine (re)starts


def engine_args(replica: Replica, model_path: Path | str, *, host: str, port: int) -> list[str]:
    """`python -m engine` arguments for a replica: the launcher's and the Kubernetes manifests' one rule."""
    args = ["serve", "--model", str(model_path), "--host", host, "--port", str(port),
            "--served-model-name", replica.model.name, "--max-num-seqs", str(replica.max_num_seqs),
            "--device", replica.device]
    if replica.dtype:
        args += ["--dtype", replica.dtype]
    if replica.quantization != "auto":
        args += ["--quantization", replica.quantization]
    if replica.kv_cache_memory:
        args += ["--kv-cache-memory", replica.kv_cache_memory]
    if replica.max_model_len:
        args += ["--max-model-len", str(replica.max_model_len)]
    return args + shlex.split(settings.LAUNCHER_ENGINE_ARGS)


def _terminate_with_parent() -> None:
    """Linux: the engine gets SIGTERM if the thread that started it dies without cleaning up (e.g. SIGKILL)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def serves_port(pid: int, port: int) -> bool:
    """Whether `pid` is alive and is `python -m engine serve ... --port PORT` (not a reused pid)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not running(pid):
        return False
    pairs = list(zip(args, args[1:], strict=False))
    return (b"engine", b"serve") in pairs and (b"--port", str(port).encode()) in pairs


class EngineProcess:
    """One engine: a child of this launcher (`popen`) or one adopted from an earlier launcher run (pid only)."""

    def __init__(self, pid: int, port: int, generation: int, log_path: Path, popen: subprocess.Popen | None = None):
        self.pid, self.port, self.generation, self.log_path, self.popen = pid, port, generation, log_path, popen
        self.started = time.monotonic()
        self.healthy_since: float | None = None
        self.checked_at = 0.0
        self.log_offset = log_path.stat().st_size if popen is None and log_path.exists() else 0
        self.deployment_id: int | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        # Its identity was checked when it was adopted; an exiting process loses its command line before
        # it is gone, so liveness is the pid's state.
        return running(self.pid)

    def exit_status(self) -> str:
        return f"status {self.popen.returncode}" if self.popen is not None else "an unknown status (adopted)"

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `timeout`; returns once the process is gone (an adopted one, not our child,
        is waited for by polling: SIGKILL is delivered asynchronously)."""
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.alive():
                break
        if self.popen is not None:
            self.popen.wait()


class Launcher:
    def __init__(self, out: TextIO = sys.stdout, *, poll: float | None = None, own_children: bool = False,
                 echo_logs: bool = False):
        self.out, self.own_children, self.echo_logs = out, own_children, echo_logs
        self.poll = settings.LAUNCHER_POLL_SECONDS if poll is None else poll
        self.state_dir = Path(settings.LAUNCHER_STATE_DIR)
        self.processes: dict[int, EngineProcess] = {}
        self.backoff: dict[int, float] = {}
        self.next_start: dict[int, float] = {}
        self.client = httpx.Client(timeout=settings.GATEWAY_HEALTH_CHECK_TIMEOUT)

    def say(self, message: str) -> None:
        self.out.write(message + "\n")
        self.out.flush()
        logger.info(message)

    def run(self, stopping: threading.Event) -> None:
        """Reconcile until `stopping` is set; then stop the engines only if they are this process's own."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            while not stopping.is_set():
                try:
                    self.reconcile()
                    (self.state_dir / "heartbeat").touch()  # compose's health check reads its age
                except DatabaseError as exc:  # the database restarts: keep the engines, retry next pass
                    logger.warning("launcher: database error, retrying: %s", exc)
                    close_old_connections()
                stopping.wait(self.poll)
        finally:
            if self.own_children:
                for replica_id in list(self.processes):
                    self._unregister(replica_id, "the launcher stopped")
                    self.processes.pop(replica_id).terminate()
            close_old_connections()

    def reconcile(self) -> None:
        replicas = list(Replica.objects.select_related("model", "deployment"))
        for replica in replicas:
            try:
                self._reconcile(replica)
            except DatabaseError:
                raise
            except Exception as exc:  # one replica's problem (a refused URL, a full disk) never stops the others
                logger.exception("launcher: %s", replica)
                self._failed(replica, f"{type(exc).__name__}: {exc}")
        for replica_id in set(self.processes) - {r.pk for r in replicas}:  # deleted rows
            self.say(f"Replica {replica_id} was deleted: stopping its engine.")
            process = self.processes.pop(replica_id)
            Deployment.objects.filter(pk=process.deployment_id).update(enabled=False, healthy=False,
                                                                        last_error="its replica was deleted")
            catalog.invalidate()
            process.terminate()
        if self.echo_logs:
            for process in self.processes.values():
                self._echo(process)

    # ---- one replica -------------------------------------------------------------------------------

    def _reconcile(self, replica: Replica) -> None:
        process = self.processes.get(replica.pk) or self._adopt(replica)
        if replica.desired == ReplicaState.STOPPED:
            if process is not None:
                self._stop(replica, process, "stopped")
            if replica.status != ReplicaStatus.STOPPED or replica.pid:
                self._update(replica, status=ReplicaStatus.STOPPED, pid=None, log_tail=self._tail(replica))
            return
        if process is None:
            if time.monotonic() >= self.next_start.get(replica.pk, 0):
                self._start(replica)
            return
        if process.generation != replica.generation:
            self._stop(replica, process, "restart requested")
            self._start(replica)
            return
        if not process.alive():
            self._exited(replica, process)
            return
        now = time.monotonic()
        if process.healthy_since is None:
            if self._answers_health(process):
                self._became_healthy(replica, process)
            elif now - process.started > settings.LAUNCHER_STARTUP_TIMEOUT:
                self.say(f"The engine of {replica} did not become healthy within "
                         f"{settings.LAUNCHER_STARTUP_TIMEOUT:.0f} s: killing it.")
                process.terminate(timeout=0)
        elif now - process.checked_at >= HEALTH_CHECK_EVERY and replica.deployment is not None:
            process.checked_at = now
            check_deployment(replica.deployment, self.client)
            self._update(replica, last_seen_at=timezone.now(), log_tail=self._tail(replica))

    def _adopt(self, replica: Replica) -> EngineProcess | None:
        """The engine an earlier launcher started for this row, if it still runs."""
        if not replica.pid or not replica.port or not serves_port(replica.pid, replica.port):
            return None
        process = EngineProcess(replica.pid, replica.port, replica.running_generation or 0, self._log_path(replica))
        process.deployment_id = replica.deployment_id
        self.processes[replica.pk] = process
        self.say(f"Adopted the running engine of {replica} (pid {replica.pid}, port {replica.port}).")
        return process

    def _start(self, replica: Replica) -> None:
        try:
            path = sources.resolve(replica.model.source)
        except sources.SourceError as exc:
            self._failed(replica, str(exc))
            return
        port = self._port(replica)
        if port is None:
            low, high = settings.LAUNCHER_PORT_RANGE
            self._failed(replica, f"no free port in LAUNCHER_PORT_RANGE {low}-{high}")
            return
        deployment = self._deployment(replica, port)
        log_path = self._log_path(replica)
        if log_path.exists() and log_path.stat().st_size > MAX_LOG_BYTES:
            log_path.replace(log_path.with_suffix(".log.1"))
        command = [sys.executable, "-m", "engine",
                   *engine_args(replica, path, host=settings.LAUNCHER_BIND_HOST, port=port)]
        with log_path.open("ab") as log:
            log.write(f"--- {timezone.now().isoformat()} launcher: {shlex.join(command)}\n".encode())
            log.flush()
            offset = log.tell()
            try:
                popen = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=settings.BASE_DIR, env={**os.environ, "ENGINE_API_KEY": deployment.internal_token},
                    start_new_session=not self.own_children,
                    preexec_fn=_terminate_with_parent if self.own_children else None,
                )
            except OSError as exc:
                self._failed(replica, f"could not start the engine: {exc}")
                return
        process = EngineProcess(popen.pid, port, replica.generation, log_path, popen)
        process.log_offset = offset
        process.deployment_id = deployment.pk
        self.processes[replica.pk] = process
        self._update(replica, status=ReplicaStatus.STARTING, pid=popen.pid, port=port,
                     running_generation=replica.generation, started_at=timezone.now())
        self.say(f"Starting the engine of {replica} on port {port} (pid {popen.pid}): {path}")

    def _became_healthy(self, replica: Replica, process: EngineProcess) -> None:
        process.healthy_since = process.checked_at = time.monotonic()
        Deployment.objects.filter(pk=replica.deployment_id).update(
            enabled=True, healthy=True, last_checked_at=timezone.now(), last_error="")
        catalog.invalidate()
        self.backoff.pop(replica.pk, None)
        self._update(replica, status=ReplicaStatus.RUNNING, last_error="", last_seen_at=timezone.now(),
                     log_tail=self._tail(replica))
        again = "back" if replica.restarts else "up"
        self.say(f"The engine is {again} at {self._url(process.port)} ({replica}).")

    def _exited(self, replica: Replica, process: EngineProcess) -> None:
        del self.processes[replica.pk]
        self._echo(process)
        backoff = self.backoff.get(replica.pk, 1.0)
        self.backoff[replica.pk] = min(backoff * 2, MAX_BACKOFF)
        self.next_start[replica.pk] = time.monotonic() + backoff
        error = f"The engine exited with {process.exit_status()}"
        self._unregister(replica.pk, error, enabled=True)
        restarts = replica.restarts + 1
        self._update(replica, status=ReplicaStatus.BACKOFF, pid=None, restarts=restarts, last_error=error,
                     log_tail=self._tail(replica))
        self.say(f"{error}; restarting it in {backoff:.0f} s (restart {restarts}, {replica}).")

    def _stop(self, replica: Replica, process: EngineProcess, why: str) -> None:
        self._unregister(replica.pk, why)
        self.say(f"Stopping the engine of {replica} (pid {process.pid}): {why}.")
        process.terminate()
        self._echo(process)
        del self.processes[replica.pk]
        self.backoff.pop(replica.pk, None)
        self.next_start.pop(replica.pk, None)

    def _failed(self, replica: Replica, error: str) -> None:
        """It cannot be started now (bad source, no port): say so on the row and retry later."""
        self.next_start[replica.pk] = time.monotonic() + MAX_BACKOFF
        if replica.last_error != error or replica.status != ReplicaStatus.FAILED:
            self.say(f"Cannot start the engine of {replica}: {error}")
            self._update(replica, status=ReplicaStatus.FAILED, pid=None, last_error=error)

    # ---- registration, ports, rows -----------------------------------------------------------------

    def _deployment(self, replica: Replica, port: int) -> Deployment:
        """The replica's Deployment at its new URL, disabled until the engine is healthy."""
        deployment = replica.deployment or Deployment(model=replica.model, internal_token=secrets.token_urlsafe(32))
        deployment.base_url = self._url(port)
        deployment.served_model_name = replica.model.name
        deployment.enabled, deployment.healthy, deployment.last_error = False, False, "starting"
        deployment.save()
        if replica.deployment_id != deployment.pk:
            Replica.objects.filter(pk=replica.pk).update(deployment=deployment)
            replica.deployment = deployment
        return deployment

    def _unregister(self, replica_id: int, why: str, *, enabled: bool = False) -> None:
        """Out of routing at once: disabled (stopped), or unhealthy until it is back (exited)."""
        fields = {"healthy": False, "last_error": why[:500], "last_checked_at": timezone.now()}
        if not enabled:
            fields["enabled"] = False
        Deployment.objects.filter(replica__pk=replica_id).update(**fields)
        catalog.invalidate()

    def _port(self, replica: Replica) -> int | None:
        taken = set(Replica.objects.filter(desired=ReplicaState.RUNNING).exclude(pk=replica.pk).exclude(port=None).values_list("port", flat=True))
        low, high = settings.LAUNCHER_PORT_RANGE
        candidates = ([replica.port] if replica.port else []) + [p for p in range(low, high + 1) if p not in taken]
        return next((p for p in candidates if self._free(p)), None)

    @staticmethod
    def _free(port: int) -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
            try:
                probe.bind((settings.LAUNCHER_BIND_HOST, port))
            except OSError:
                return False
        return True

    def _answers_health(self, process: EngineProcess) -> bool:
        try:
            return self.client.get(f"{self._url(process.port)}/health").status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _url(port: int) -> str:
        return f"http://{settings.LAUNCHER_HOST}:{port}"

    def _log_path(self, replica: Replica) -> Path:
        return self.state_dir / f"replica-{replica.pk}.log"

    def _tail(self, replica: Replica) -> str:
        path = self._log_path(replica)
        try:
            with path.open("rb") as log:
                log.seek(max(path.stat().st_size - LOG_TAIL_BYTES, 0))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _echo(self, process: EngineProcess) -> None:
        """runplatform: the engines' output on its console as well as in their log files."""
        if not self.echo_logs:
            return
        try:
            with process.log_path.open("rb") as log:
                log.seek(process.log_offset)
                data = log.read()
        except OSError:
            return
        process.log_offset += len(data)
        if data:
            self.out.write(data.decode("utf-8", "replace"))
            self.out.flush()

    @staticmethod
    def _update(replica: Replica, **fields) -> None:
        """Runtime fields only (quiet in the audit log), on the row and on the instance."""
        Replica.objects.filter(pk=replica.pk).update(**fields)
        for name, value in fields.items():
            setattr(replica, name, value)
