import threading

import pytest

from shared.errors import NotFound
from shared.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobStore


def test_records_survive_a_restart_and_interrupted_jobs_are_failed(tmp_path):
    store = JobStore(tmp_path, "convert")
    a, _ = store.create({"x": 1}, labels={"team": "nlp"})
    b, _ = store.create({"x": 2})
    store.update(a.job_id, state=RUNNING, progress={"done": 3, "total": 10})
    store.update(b.job_id, state=SUCCEEDED, result={"ok": True})
    store.append_log(a.job_id, "halfway")
    again = JobStore(tmp_path, "convert")
    assert again.recover("restarted") == [a.job_id]
    ra = again.get(a.job_id)
    assert (
        ra.state == FAILED
        and ra.error == "restarted"
        and ra.progress["done"] == 3
        and ra.labels == {"team": "nlp"}
    )
    assert again.get(b.job_id).result == {"ok": True}
    assert again.read_log(a.job_id)[0] == ["halfway"]
    assert [r.job_id for r in again.list()] == [b.job_id, a.job_id] or {r.job_id for r in again.list()} == {
        a.job_id,
        b.job_id,
    }


def test_request_id_makes_submit_idempotent(tmp_path):
    store = JobStore(tmp_path, "convert")
    a, new_a = store.create({}, request_id="r1")
    b, new_b = store.create({}, request_id="r1")
    assert a.job_id == b.job_id and new_a and not new_b


def test_watch_follows_to_the_terminal_state(tmp_path):
    store = JobStore(tmp_path, "eval")
    rec, _ = store.create({})

    def work():
        store.update(rec.job_id, state=RUNNING)
        store.append_log(rec.job_id, "line 1")
        store.update(rec.job_id, state=CANCELLED, error="stop")

    threading.Timer(0.05, work).start()
    states, lines = [], []
    for r, new in store.watch(rec.job_id):
        states.append(r.state)
        lines += new
    assert states[-1] == CANCELLED and "line 1" in lines
    with pytest.raises(NotFound):
        store.get("eval-nope")
