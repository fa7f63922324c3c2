"""The done records: append-only logs per writer, torn lines tolerated, newest record wins."""

import json
import multiprocessing as mp
import shutil

import pytest

from pssr.blockwise.ledger import LocalLedger, ledger_for


def test_records_forget_and_newest_wins(tmp_path):
    led = LocalLedger(tmp_path)
    led.record([("a", {"digest": {"s0": "1"}}), ("b", {"digest": {"s0": "2"}})])
    led.record([("a", {"digest": {"s0": "3"}})])  # redone: the newer record wins
    led.forget(["b"])
    assert LocalLedger(tmp_path).load() == {"a": {"digest": {"s0": "3"}}}
    led.record([("b", {"x": 1})])  # done again after being forgotten
    assert LocalLedger(tmp_path).load()["b"] == {"x": 1}
    assert len(list((tmp_path).iterdir())) == 1  # one log per writer process


def test_torn_last_line_and_garbage_are_skipped(tmp_path):
    led = LocalLedger(tmp_path)
    led.record([("a", {"v": 1}), ("b", {"v": 2})])
    log = next((tmp_path).iterdir())
    data = log.read_bytes()
    log.write_bytes(data[:-7])  # kill -9 in the middle of the last line
    assert LocalLedger(tmp_path).load() == {"a": {"v": 1}}
    (tmp_path / "x.1.ab.jsonl").write_bytes(b'\xff\xfe{"k": 3}\n[1, 2]\n{"k":"c","t":1}\n')
    assert set(LocalLedger(tmp_path).load()) == {"a", "c"}


def test_markers_of_older_versions_still_resume(tmp_path):
    d = tmp_path
    (d / "0.0-16.0-16").write_text(json.dumps({"digest": {"s0": "ab"}}))
    (d / "0.0-16.16-32").write_text('{"dig')  # cut by a crash: redone
    (d / ".0.16-32.0-16.tmp").write_text("{}")
    assert LocalLedger(tmp_path).load() == {"0.0-16.0-16": {"digest": {"s0": "ab"}}}


def test_output_replaced_under_an_open_log_gets_a_new_log(tmp_path):
    out = tmp_path / "o.zarr"
    led = ledger_for(out)
    led.record([("a", {})])
    shutil.rmtree(out)  # --overwrite in the same process
    out.mkdir()
    led.record([("b", {})])
    assert set(ledger_for(out).load()) == {"b"}
    led.clear()
    assert not out.exists() and LocalLedger(out).load() == {}


def _writer(out, start, n):
    led = LocalLedger(out)
    for i in range(start, start + n, 10):
        led.record([(f"k{j}", {"i": j}) for j in range(i, min(i + 10, start + n))])


@pytest.mark.parametrize("procs", [3])
def test_concurrent_writer_processes_lose_nothing(tmp_path, procs):
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_writer, args=(str(tmp_path), 1000 * p, 300)) for p in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    got = LocalLedger(tmp_path).load()
    assert set(got) == {f"k{1000 * p + j}" for p in range(procs) for j in range(300)}
    assert len(list((tmp_path).iterdir())) == procs
