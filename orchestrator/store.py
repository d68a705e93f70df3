"""The MLflow store, whatever sweep it holds: where it is, a client that fails fast, retries
while it is unreachable, the writer thread, experiments, and text artifacts.

While trials run, writes go through a :class:`Writer` thread: the sweep loop never waits
on the store, and a write that fails because the store is unreachable (a server
restarting) is retried, in order, until it lands.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional


def resolve_uri(configured: Optional[str]) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory;
    without its credentials, which go to MLflow's environment variables (orchestrator.credentials)."""
    from orchestrator import credentials

    if configured:
        return credentials.take_from_uri(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = credentials.take_from_uri(os.environ["MLFLOW_TRACKING_URI"])
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_url(uri: str, experiment_id: str) -> Optional[str]:
    """The MLflow UI's runs table of an experiment on a tracking server (its GenAI view is the default)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


# Signs of a service (an MLflow store, a Ray dashboard) unreachable or not ready for now, not of
# a bad request: worth retrying.
TRANSIENT = ("max retries exceeded", "connection refused", "connection reset", "connection aborted",
             "failed to establish", "timed out", "database is locked", "temporarily unavailable",
             "bad gateway", "service unavailable", "remote end closed", "try again later")
RETRY_DELAYS_S = (0.5, 1, 2, 4, 5)  # then every 5 s


def is_transient(error: BaseException) -> bool:
    seen: Optional[BaseException] = error
    while seen is not None:
        if any(t in str(seen).lower() for t in TRANSIENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(fn: Callable[[], Any], deadline_s: float, what: str, service: str = "mlflow: store") -> Any:
    """Call ``fn`` until it succeeds, retrying transient errors of ``service`` for up to ``deadline_s``."""
    started = time.monotonic()
    for attempt in range(10 ** 9):
        try:
            return fn()
        except Exception as error:
            if not is_transient(error) or time.monotonic() - started > deadline_s:
                raise
            if attempt == 0:
                print(f"{what}: {service} unreachable, retrying ({str(error).splitlines()[0][:160]})",
                      file=sys.stderr)
            time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])


class Writer:
    """Runs MLflow writes on one thread, each retried while the store is unreachable. ``flush``
    waits for all of them. Writes run in submission order, except that ``deferrable`` ones (a
    trial's start, which makes its run) yield to the rest: when results come faster than runs can
    be made, a result's record makes its run itself, in fewer writes, and the deferred one is a no-op."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.errors: list[str] = []  # writes refused by the store (not transient): reported, not retried
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable, *args, deferrable: bool = False) -> None:
        self._queue.put((deferrable, next(self._order), what, fn, args))

    def _work(self) -> None:
        while True:
            _, _, what, fn, args = self._queue.get()
            try:
                retrying(lambda: fn(*args), float("inf"), what)
            except Exception as error:
                self.errors.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            finally:
                self._queue.task_done()

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted write is done; False if some are still pending after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending


def client(uri: str):
    """An MlflowClient whose HTTP calls fail fast when the server is down: :func:`retrying`
    and the :class:`Writer` retry them, with backoff the sweep can see and bound."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates a new store's tables on first use; two drivers doing that at once on one
    # new file crash in its schema migration. One at a time (the lock is a file beside it).
    with FileLock(str(db.parent / f".{db.name}.init-lock")):
        _use_wal(db)
        mlflow_client = MlflowClient(tracking_uri=uri)
        _sync_wal_at_checkpoints(mlflow_client)
    return mlflow_client


PROBE_TIMEOUT_S = 5.0


def connect(uri: str):
    """A client of ``uri`` once the store has answered: a dead or wrong store is bad input, one
    line (ConfigError) within seconds, before anything is submitted. An outage later in a sweep
    is retried (:class:`Writer`)."""
    import socket
    from urllib.parse import urlsplit

    from orchestrator.errors import ConfigError

    allowed = "allowed: a reachable MLflow tracking server (http[s]://host:port), a sqlite:///path file, or unset"
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        try:
            socket.create_connection((parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=PROBE_TIMEOUT_S).close()
        except OSError as error:
            raise ConfigError("tracking.uri", uri, allowed,
                              problem=f"unreachable ({error.strerror or type(error).__name__})") from None
    try:
        mlflow_client = client(uri)
        mlflow_client.search_experiments(max_results=1)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError("tracking.uri", uri, allowed, problem=f"not a store this can use ({first})") from None
    return mlflow_client


def _use_wal(db: Path) -> None:
    """Put a local sqlite store in write-ahead-log mode (a setting the file keeps): a commit
    costs one fsync instead of several, and readers (`orchestrator status`, the MLflow UI)
    never block the sweep's writer, nor it them."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _sync_wal_at_checkpoints(mlflow_client) -> None:
    """``PRAGMA synchronous=NORMAL`` on the store's connections: in WAL mode a commit then
    appends to the log without an fsync, and the log is synced at checkpoints. A crash of the
    driver loses nothing; a power cut may lose the last commits, never the file's integrity."""
    from sqlalchemy import event

    engine = getattr(getattr(getattr(mlflow_client, "_tracking_client", None), "store", None), "engine", None)
    if engine is None:  # MLflow moved its store: stay correct, only slower
        return
    if not event.contains(engine, "connect", _synchronous_normal):  # MLflow shares one engine per URI
        event.listen(engine, "connect", _synchronous_normal)
        engine.dispose()  # pooled connections made before the listener reconnect with it


def _synchronous_normal(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def open_experiment(mlflow_client, name: str) -> str:
    """The id of experiment ``name``, made if new; safe when other drivers make it at the same moment."""
    from mlflow.exceptions import MlflowException

    from orchestrator.errors import ConfigError

    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = mlflow_client.get_experiment_by_name(name)  # another driver made it first
    if found.lifecycle_stage != "active":
        raise ConfigError("sweep.name", name, "a new name, or restore the experiment (mlflow experiments restore "
                          f"--experiment-id {found.experiment_id})", problem="its experiment is deleted in the store")
    return found.experiment_id


def upload_texts(artifact_uri: str, tracking_uri: str, files: dict[str, str]) -> None:
    """Write text artifacts straight to a run's artifact store (no tracking calls): into its folder
    when the store is a local one, else one upload of a temporary folder."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    if isinstance(repo, LocalArtifactRepository):
        _write_texts(Path(repo.artifact_dir), files)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_texts(Path(tmp), files)
        repo.log_artifacts(tmp)


def download_text(mlflow_client, run_id: str, name: str, max_bytes: int) -> Optional[str]:
    """A run's text artifact, or None if it has none; ValueError if it is over ``max_bytes`` or not
    UTF-8 (what the store holds is untrusted input)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(mlflow_client.download_artifacts(run_id, name, tmp))
        except Exception:  # absent: a reused, older or failed run
            return None
        if not path.is_file():
            raise ValueError(f"{name}: not a file")
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{name}: larger than {max_bytes} bytes")
        try:
            return path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            raise ValueError(f"{name}: not readable UTF-8 text") from None


def _write_texts(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
