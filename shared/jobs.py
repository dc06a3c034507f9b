"""Long-running jobs, the same way in every service: Submit -> id, Get, Watch, Cancel, List.

:class:`JobStore` keeps one JSON record per job on disk (records survive a service restart) plus a
log file, and wakes watchers on every change. :class:`ProcessRunner` runs each job as a child process
in its own session, so a cancel can stop it and everything it started; the child reports through its
stdout with :class:`Reporter` lines (``@@progress {...}``, ``@@result {...}``, ``@@error message``),
and any other line goes to the job's log.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import write_text_atomic
from shared.errors import FailedPrecondition, NotFound, ResourceExhausted

logger = logging.getLogger(__name__)

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class JobRecord:
    job_id: str
    kind: str
    spec: dict[str, Any]
    state: str = PENDING
    progress: dict[str, Any] = field(
        default_factory=lambda: {"done": 0.0, "total": 0.0, "unit": "", "message": "", "metrics": {}}
    )
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    created_unix_s: float = 0.0
    started_unix_s: float = 0.0
    finished_unix_s: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    attempt: int = 1
    request_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # service-specific bookkeeping (e.g. Ray ids)

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.state in TERMINAL


class WatchSlots:
    """At most ``limit`` long-lived watch streams at once; one more is refused at once (RESOURCE_EXHAUSTED,
    HTTP 429) instead of holding a handler thread that a submission may need."""

    def __init__(self, limit: int, setting: str) -> None:
        self.limit, self.setting = limit, setting
        self._lock = threading.Lock()
        self.open = 0

    def acquire(self) -> None:
        """Take a watch slot, or 429 (ResourceExhausted) naming the setting when all are taken."""
        with self._lock:
            if self.open >= self.limit:
                raise ResourceExhausted(
                    f"{self.limit} watch streams are open already ({self.setting}); retry later",
                    field="job_id",
                )
            self.open += 1

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self.open -= 1

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """A slot for the duration of a ``with`` block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()


class JobStore:
    def __init__(
        self, root: Path, kind: str, *, max_watchers: int = 32, watchers_setting: str = "max_watchers"
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.watchers = WatchSlots(max_watchers, watchers_setting)
        self._cv = threading.Condition()
        self._jobs: dict[str, JobRecord] = {}
        self._version: dict[str, int] = {}
        for f in sorted(self.root.glob("*/job.json")):
            try:
                rec = JobRecord(**json.loads(f.read_text()))
            except (ValueError, TypeError) as e:
                logger.warning("skipping unreadable job record %s: %s", f, e)
                continue
            self._jobs[rec.job_id] = rec
            self._version[rec.job_id] = 0

    # -- records ---------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """The folder of a job's record and log."""
        return self.root / job_id

    def log_path(self, job_id: str) -> Path:
        """The job's log file."""
        return self.job_dir(job_id) / "job.log"

    def _save(self, rec: JobRecord) -> None:
        write_text_atomic(
            self.job_dir(rec.job_id) / "job.json", json.dumps(dataclasses.asdict(rec), indent=1)
        )

    def create(
        self, spec: dict[str, Any], *, labels: dict[str, str] | None = None, request_id: str = ""
    ) -> tuple[JobRecord, bool]:
        """A new pending job, or the existing one with the same request id (idempotent submit)."""
        with self._cv:
            if request_id:
                for rec in self._jobs.values():
                    if rec.request_id == request_id:
                        return rec, False
            job_id = f"{self.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            rec = JobRecord(
                job_id=job_id,
                kind=self.kind,
                spec=spec,
                created_unix_s=time.time(),
                labels=dict(labels or {}),
                request_id=request_id,
            )
            self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
            self._jobs[job_id] = rec
            self._version[job_id] = 1
            self._save(rec)
            self._cv.notify_all()
            return rec, True

    def get(self, job_id: str) -> JobRecord:
        """A copy of the record (404 naming job_id when unknown)."""
        with self._cv:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise NotFound(f"no {self.kind} job {job_id!r}", field="job_id")
            return dataclasses.replace(rec)

    def list(self, state: str | None = None, limit: int = 0) -> list[JobRecord]:
        """Records, newest first, optionally of one state, at most ``limit`` (0 = all)."""
        with self._cv:
            recs = sorted(self._jobs.values(), key=lambda r: r.created_unix_s, reverse=True)
        recs = [dataclasses.replace(r) for r in recs if state is None or r.state == state]
        return recs[:limit] if limit > 0 else recs

    def update(self, job_id: str, **changes: Any) -> JobRecord:
        """Change fields of a record (written atomically) and wake its watchers; returns the new record."""
        with self._cv:
            rec = self._jobs[job_id]
            for k, v in changes.items():
                if k == "progress":
                    rec.progress = {**rec.progress, **v}
                else:
                    setattr(rec, k, v)
            if changes.get("state") == RUNNING and not rec.started_unix_s:
                rec.started_unix_s = time.time()
            if changes.get("state") in TERMINAL and not rec.finished_unix_s:
                rec.finished_unix_s = time.time()
            self._save(rec)
            self._version[job_id] += 1
            self._cv.notify_all()
            return dataclasses.replace(rec)

    def append_log(self, job_id: str, line: str) -> None:
        """Append a line to the job's log and wake its watchers."""
        with open(self.log_path(job_id), "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
        with self._cv:
            self._version[job_id] = self._version.get(job_id, 0) + 1
            self._cv.notify_all()

    def read_log(self, job_id: str, offset: int = 0) -> tuple[builtins.list[str], int]:
        """Log lines from byte ``offset``, and the offset to read from next."""
        path = self.log_path(job_id)
        if not path.is_file():
            return [], offset
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            data = f.read()
            return data.splitlines(), f.tell()

    def recover(self, reason: str) -> builtins.list[str]:
        """Mark jobs left pending/running by a previous process as failed; returns their ids."""
        lost = [r.job_id for r in self.list() if not r.terminal]
        for job_id in lost:
            self.update(job_id, state=FAILED, error=reason)
        return lost

    # -- watching --------------------------------------------------------------------------------
    def watch(
        self, job_id: str, is_active: Callable[[], bool] = lambda: True, poll_s: float = 1.0
    ) -> Iterator[tuple[JobRecord, builtins.list[str]]]:
        """The record and new log lines on every change, until the job is terminal (then once more). Counts
        against :attr:`watchers` while it lasts."""
        self.get(job_id)
        with self.watchers.hold():
            yield from self._watch(job_id, is_active, poll_s)

    def _watch(
        self, job_id: str, is_active: Callable[[], bool], poll_s: float
    ) -> Iterator[tuple[JobRecord, builtins.list[str]]]:
        seen, offset = -1, 0
        while is_active():
            with self._cv:
                if self._version.get(job_id, 0) == seen:
                    self._cv.wait(timeout=poll_s)
                version = self._version.get(job_id, 0)
            if version == seen:
                continue
            seen = version
            lines, offset = self.read_log(job_id, offset)
            rec = self.get(job_id)
            yield rec, lines
            if rec.terminal:
                return


class Reporter:
    """Used inside a job's child process: progress and results go to stdout for the parent to read."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self._last = 0.0

    def _emit(self, tag: str, payload: str) -> None:
        self.stream.write(f"@@{tag} {payload}\n")
        self.stream.flush()

    def progress(
        self,
        done: float,
        total: float,
        unit: str = "",
        message: str = "",
        force: bool = False,
        **metrics: float,
    ) -> None:
        """Record progress (at most 5 updates a second unless ``force``)."""
        now = time.monotonic()
        if not force and done < total and now - self._last < 0.2:
            return  # at most 5 updates a second
        self._last = now
        self._emit(
            "progress",
            json.dumps({"done": done, "total": total, "unit": unit, "message": message, "metrics": metrics}),
        )

    def result(self, doc: dict[str, Any]) -> None:
        """Record the job's result document."""
        self._emit("result", json.dumps(doc))

    def error(self, message: str) -> None:
        """Record why the job failed."""
        self._emit("error", json.dumps(message))


class ProcessRunner:
    """Runs jobs as child processes: ``argv_for(record)`` is the command, at most ``max_concurrent`` at
    once."""

    def __init__(
        self,
        store: JobStore,
        argv_for: Callable[[JobRecord], list[str]],
        *,
        max_concurrent: int = 1,
        env: dict[str, str] | None = None,
        on_end: Callable[[JobRecord], None] | None = None,
        cancel_grace_s: float = 10.0,
    ) -> None:
        self.store = store
        self.argv_for = argv_for
        self.env = env or {}
        self.on_end = on_end
        self.grace_s = cancel_grace_s
        self._slots = threading.Semaphore(max_concurrent)
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: dict[str, str] = {}
        self._lock = threading.Lock()

    def submit(self, rec: JobRecord) -> None:
        """Queue the job; it starts when a slot is free."""
        threading.Thread(target=self._run, args=(rec.job_id,), name=f"job-{rec.job_id}", daemon=True).start()

    def cancel(self, job_id: str, reason: str) -> JobRecord:
        """Cancel a queued or running job (its process group gets SIGTERM, then SIGKILL after the grace);
        FailedPrecondition when it has ended."""
        rec = self.store.get(job_id)
        if rec.terminal:
            raise FailedPrecondition(f"job {job_id} already {rec.state}", field="job_id")
        with self._lock:
            self._cancelled[job_id] = reason or "cancelled by request"
            proc = self._procs.get(job_id)
        if proc is None:  # still pending: it will see the flag and not start
            return self.store.update(job_id, state=CANCELLED, error=self._cancelled[job_id])
        _stop_group(proc, self.grace_s)
        deadline = time.monotonic() + self.grace_s + 5
        while not self.store.get(job_id).terminal and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.store.get(job_id)

    def shutdown(self) -> None:
        """Stop starting jobs and end the running ones."""
        with self._lock:
            procs = list(self._procs.items())
        for job_id, proc in procs:
            self._cancelled.setdefault(job_id, "the service shut down")
            _stop_group(proc, self.grace_s)

    def _run(self, job_id: str) -> None:
        with self._slots:
            with self._lock:
                if job_id in self._cancelled:
                    return
                rec = self.store.update(job_id, state=RUNNING, progress={"message": "starting"})
                argv = self.argv_for(rec)
                proc = subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                    start_new_session=True,
                    env={**os.environ, **self.env},
                    stdin=subprocess.DEVNULL,
                )
                self._procs[job_id] = proc
            error = ""
            result: dict[str, Any] = {}
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("@@progress "):
                    self.store.update(job_id, progress=json.loads(line[11:]))
                elif line.startswith("@@result "):
                    result = json.loads(line[9:])
                elif line.startswith("@@error "):
                    error = json.loads(line[8:])
                    self.store.append_log(job_id, f"error: {error}")
                else:
                    self.store.append_log(job_id, line)
            code = proc.wait()
            with self._lock:
                self._procs.pop(job_id, None)
                reason = self._cancelled.get(job_id)
            if reason is not None:
                rec = self.store.update(job_id, state=CANCELLED, error=reason)
            elif code == 0 and not error:
                rec = self.store.update(job_id, state=SUCCEEDED, result=result)
            else:
                why = error or f"worker exited with code {code} (see the job log)"
                rec = self.store.update(job_id, state=FAILED, error=why, result=result)
            if self.on_end is not None:
                self.on_end(rec)


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
