"""The pieces the benchmarks share (``bench/common.py``, ``bench/services.py``), without a cluster:
the alternation order, the closed-loop runs against a local stand-in server, the reports' saved
form, and the lifecycle that stops whatever a benchmark started."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from bench import peer, serve
from bench.common import ClosedLoopRuns, read_json, rotated
from bench.drills import server_outage
from bench.services import Lifecycle

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_rotated_starts_at_the_offset_modulo_the_length():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 5) == ["c", "a", "b"]


def test_the_schedule_runs_every_block_on_every_system_each_round_the_first_rotating():
    runs = ClosedLoopRuns(rounds=2, warmup_s=0, duration_s=1, max_noise=1, quiet_wait=0)
    order = list(runs.schedule(["64", "128"], ("merge", "nomerge")))
    assert order == [
        (0, "64", "merge"),
        (0, "64", "nomerge"),
        (0, "128", "nomerge"),
        (0, "128", "merge"),
        (1, "64", "merge"),
        (1, "64", "nomerge"),
        (1, "128", "nomerge"),
        (1, "128", "merge"),
    ]


def test_the_settings_a_report_records_keep_their_order_and_name_a_bound_only_when_set():
    unbounded = ClosedLoopRuns(rounds=2, warmup_s=3.0, duration_s=10.0, max_noise=0.1, quiet_wait=3.0)
    assert list(unbounded.settings().items()) == [
        ("rounds", 2),
        ("duration_s", 10.0),
        ("warmup_s", 3.0),
        ("max_noise", 0.1),
    ]
    bounded = ClosedLoopRuns(2, 3.0, 10.0, 0.1, 3.0, "b64_json", 1000)
    assert list(bounded.settings()) == ["rounds", "duration_s", "warmup_s", "max_requests", "max_noise"]


class _Images(BaseHTTPRequestHandler):
    """Stands in for ``POST /v1/images/generations``: a job id per request, counted."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.count += 1  # type: ignore[attr-defined]
        body = json.dumps({"job_id": f"job_{self.server.count}", "data": [{"url": "x"}]}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_measured_cell_keeps_its_samples_and_the_quiet_wait(capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.count = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        runs = ClosedLoopRuns(rounds=1, warmup_s=0.0, duration_s=30.0, max_noise=1.0, quiet_wait=0.0, max_requests=5)
        cell = runs.measure(url, "key", "merge", "64x64", 2, 0, "merge    64x64   ")
    finally:
        server.shutdown()
        server.server_close()
    assert runs.cells == [cell]
    assert (cell.label, cell.size, cell.clients, cell.round) == ("merge", "64x64", 2, 0)
    assert len(runs.samples) == 5 == server.count  # type: ignore[attr-defined]
    assert {s.job_id for s in runs.samples} == {f"job_{i}" for i in range(1, 6)}
    assert all(s.status == 200 and (s.label, s.clients) == ("merge", 2) for s in runs.samples)
    assert runs.quiet_wait_s == cell.quiet_wait_s
    assert "round 1/1 merge    64x64    x2  : 5 images" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "name"), [(serve, "serve.json.gz"), (peer, "peer.json.gz")])
def test_a_closed_loop_report_survives_its_json(module, name):
    report = module.Report.from_json(read_json(RESULTS / name))
    again = module.Report.from_json(json.loads(json.dumps(report.to_json())))
    assert again.markdown() == report.markdown()
    assert [t["verdict"] for t in report.to_json()["targets"]] == [t.verdict for t in report.targets()]
    text = report.markdown()
    assert text.startswith(f"### {name.split('.')[0].title()} benchmark, {report.meta['date']}\n")
    assert f"Wall time {report.meta['wall_s']:.0f} s (" in text
    assert text.endswith(report.targets()[-1].line())


class _Started(Lifecycle):
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")
        if self.fail:
            raise RuntimeError("half started")

    def stop(self) -> None:
        self.events.append("stop")


def test_a_lifecycle_stops_after_use_and_after_a_failed_start():
    with _Started(fail=False) as ok:
        assert ok.events == ["start"]
    assert ok.events == ["start", "stop"]
    failing = _Started(fail=True)
    with pytest.raises(RuntimeError, match="half started"), failing:
        pass
    assert failing.events == ["start", "stop"]


class _Server:
    def __init__(self) -> None:
        self.events: list[str] = []

    def stop(self) -> None:
        self.events.append("stop")

    def start(self) -> None:
        self.events.append("start")


def test_an_outage_restarts_the_server_also_when_cancelled():
    server = _Server()
    fault = asyncio.run(server_outage(server, 0.05, "a server"))  # type: ignore[arg-type]
    assert server.events == ["stop", "start"]
    assert fault.notes == {"stopped": "a server", "seconds": 0.05}
    assert fault.ended_at - fault.started_at >= 0.05

    cut = _Server()

    async def cancelled() -> None:
        task = asyncio.create_task(server_outage(cut, 60, "a server"))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert cut.events == ["stop", "start"]


def test_cpu_by_process_names_replicas_by_deployment_and_sums_them():
    from bench.common import cpu_by_process

    before = {
        1: ("ray::ServeReplica:burst:Scheduler.handle_request", 10.0),
        2: ("ray::ServeReplica:burst:Engine-turbo-bulk", 1.0),
        3: ("ray::ServeReplica:burst:Engine-turbo-bulk.handle_request_with_rejection", 1.0),
        4: ("weed", 5.0),
        5: ("raylet", 0.0),
    }
    after = {
        1: ("ray::ServeReplica:burst:Scheduler", 16.0),  # the title names the method it runs now
        2: ("ray::ServeReplica:burst:Engine-turbo-bulk", 2.0),
        3: ("ray::ServeReplica:burst:Engine-turbo-bulk", 3.0),
        4: ("weed", 5.5),
        6: ("ray::IDLE", 9.0),  # started meanwhile: no reading before, not counted
    }
    shares = cpu_by_process(before, after, seconds=10.0)
    assert shares == pytest.approx({"Scheduler": 0.6, "Engine-turbo-bulk": 0.3, "weed": 0.05})
    assert list(shares) == ["Scheduler", "Engine-turbo-bulk", "weed"]
