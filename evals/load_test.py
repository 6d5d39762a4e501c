"""Many visitors at once on the studio in Space mode: throughput, queue waits, latency, and isolation between them.

    python -m evals.load_test [--visitors 8] [--steps 4] [--preset quick] [--idle-minutes 0.5] [--json]

Starts `app.py --model demo` as a Hugging Face Space runs it (SPACE_ID set: a private library per visitor, the model
fixed) on 127.0.0.1, in a temporary folder of its own ($TMPDIR), and drives N visitors at once with gradio_client, one
Client (one session) each: generate, register a subject from one photo, generate with it, reuse the PNG's settings,
save the project and export the subject. Then every visitor tries to reach every other visitor's subjects, images,
projects and exports: by name through the API (export, rename, delete, apply a relation, generate with <name>) and by
path through Gradio's file route (absolute paths, `..` out of Gradio's cache, %2F- and %252F-encoded separators, a
symbolic link in the cache). It counts every answer that hands over another visitor's bytes or subject
("cross-visitor reads", which must be 0), checks that a visitor's folders are gone once its Client closes, and that a
REST client (no heartbeat, so no unload) is forgotten after --idle-minutes.

tests/studio/test_load_isolation.py runs the same visitors in-process on the tiny test model (3 visitors, tiny work).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from gradio_client import Client, handle_file
from gradio_client.utils import Status

ROOT = Path(__file__).resolve().parents[1]
CANVAS = json.dumps({"width": 64, "height": 64, "regions": [
    {"id": "r1", "label": "red ball", "box": [0.05, 0.3, 0.45, 0.75]},
    {"id": "r2", "label": "blue box", "box": [0.55, 0.3, 0.95, 0.75]}]})  # fmt: skip
# a visitor done with its jobs looks at its results (a light request) while it waits for the others, as a person
# whose page is open would: the run's short idle expiry is for REST clients that have gone, not for the slow queue
PRESENT_EVERY_S = 10.0
STARTED = (Status.PROCESSING, Status.ITERATING, Status.PROGRESS, Status.LOG, Status.FINISHED)


@dataclass
class Timing:
    kind: str
    wait: float  # submitted → the handler started (time in the queue)
    latency: float  # submitted → the last output


@dataclass
class Visitor:
    index: int
    session: str = ""
    timings: list[Timing] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # what the server handed this visitor: kind -> path
    errors: list[str] = field(default_factory=list)


def folder_name(session: str) -> str:
    """The folder a session's library and outputs live in (studio/ui/jobs.py: never the raw id)."""
    return hashlib.sha256(session.encode()).hexdigest()[:24]


def timed(client: Client, visitor: Visitor, kind: str, *args, api_name: str, **kwargs):
    """Submit a job, note when the server starts it and when it ends; its result."""
    submitted = time.perf_counter()
    job = client.submit(*args, api_name=api_name, **kwargs)
    started = None
    while not job.done():
        if started is None and job.status().code in STARTED:
            started = time.perf_counter()
        time.sleep(0.02)
    result = job.result()
    ended = time.perf_counter()
    visitor.timings.append(Timing(kind, (started or ended) - submitted, ended - submitted))
    return result


def value_of(update) -> str:
    return update["value"] if isinstance(update, dict) and "value" in update else update


def work(client: Client, visitor: Visitor, photo: str, steps: int, preset: str) -> None:
    """One visitor's session: generate, register, generate with the subject, reuse, save a project, export."""
    name = f"v{visitor.index}"
    generate = dict(negative_prompt="", canvas=CANVAS, seed=visitor.index, random_seed=False, steps=steps,
                    fit_boxes="off")  # fmt: skip
    _, gallery = timed(client, visitor, "generate", prompt="a red ball next to a blue box", **generate,
                       api_name="/generate")  # fmt: skip
    visitor.files["image"] = gallery[0]["image"]
    timed(client, visitor, "register", [handle_file(photo)], name, "ball", preset, api_name="/register")
    _, gallery = timed(client, visitor, "generate", prompt=f"a red ball next to a blue box and <{name}>", **generate,
                       api_name="/generate")  # fmt: skip
    visitor.files["subject image"] = gallery[0]["image"]
    timed(client, visitor, "reuse", handle_file(gallery[0]["image"]), api_name="/open_png")
    project = timed(
        client,
        visitor,
        "project",
        prompt=f"a red ball next to a blue box and <{name}>",
        canvas=CANVAS,
        api_name="/save_project",
    )
    visitor.files["project"] = value_of(project)
    visitor.files["export"] = value_of(timed(client, visitor, "export", name, api_name="/export_subject"))


def run_visitors(url: str, count: int, photo: str, steps: int, preset: str, leave: threading.Event | None = None,
                 downloads: Path | None = None) -> tuple[list[Visitor], list[Client]]:  # fmt: skip
    """All visitors at once, one thread and one Client each; the Clients stay open (their sessions alive). With
    `leave`, the visitors stay present (a light request every PRESENT_EVERY_S) until it is set; results download
    into `downloads` (the server's cache, so the file route's control can fetch them; default: Gradio's)."""
    visitors = [Visitor(i) for i in range(count)]
    clients: list[Client | None] = [None] * count
    finished = threading.Semaphore(0)
    everyone = leave or threading.Event()
    where = {"download_files": str(downloads)} if downloads else {}

    def one(visitor: Visitor) -> None:
        try:
            client = clients[visitor.index] = Client(url, verbose=False, **where)
            visitor.session = client.session_hash
            work(client, visitor, photo, steps, preset)
            finished.release()
            while not everyone.wait(PRESENT_EVERY_S):  # still on the page: the idle expiry must not take it
                client.predict("", api_name="/refresh")
        except Exception as error:  # noqa: BLE001 - counted as an unfinished visitor
            visitor.errors.append(f"{type(error).__name__}: {error}")
            finished.release()

    threads = [threading.Thread(target=one, args=(v,)) for v in visitors]
    for thread in threads:
        thread.start()
    for _ in threads:
        finished.acquire()
    if leave is None:
        everyone.set()
        for thread in threads:
            thread.join()
    return visitors, [c for c in clients if c is not None]


# ------------------------------------------------------------------------------------------------ isolation
def api_probes(client: Client, other: str) -> list[str]:
    """What this visitor's session can get of subject `other` through the API: a list of what succeeded."""
    leaks = []
    probes = {
        "export": dict(args=(other,), api_name="/export_subject"),
        "rename": dict(args=(other, other + "x"), api_name="/rename_subject"),
        "delete": dict(args=(other,), api_name="/delete_subject"),
        "apply relation": dict(args=("next to", f"<{other}>", "blue box", "", CANVAS), api_name="/apply_relation"),
    }
    for what, probe in probes.items():
        try:
            client.predict(*probe["args"], api_name=probe["api_name"])
            leaks.append(f"{what} <{other}>")
        except Exception:  # noqa: BLE001 - refused, as it must be
            pass
    return leaks


def route_variants(path: str, cache: Path) -> list[str]:
    """The ways to name a file on the server in /gradio_api/file=…: absolute, `..` out of Gradio's cache, encoded."""
    relative = os.path.relpath(path, cache)
    quoted = urllib.parse.quote(path, safe="")
    return [path, f"{cache}/{relative}", quoted, quoted.replace("%2F", "%252F"), f"{cache}/x/../{relative}",
            path.replace("/", "//")]  # fmt: skip


def file_probes(url: str, paths: list[str], cache: Path) -> tuple[int, list[str]]:
    """GET every variant of every path; (probes made, those answered 200 with the file's bytes)."""
    leaks, made = [], 0
    with httpx.Client(timeout=30) as http:
        for path in paths:
            for variant in route_variants(path, cache):
                made += 1
                answer = http.get(f"{url.rstrip('/')}/gradio_api/file={variant}")
                if answer.status_code == 200 and answer.content == Path(path).read_bytes():
                    leaks.append(variant)
    return made, leaks


def private_files(tmp: Path, session: str) -> list[str]:
    """Every file of a visitor's library and outputs, as the server stores them."""
    folders = [tmp / "troupe-libraries" / folder_name(session), tmp / "troupe-outputs" / folder_name(session)]
    return [str(p) for folder in folders if folder.is_dir() for p in sorted(folder.rglob("*")) if p.is_file()]


def isolation(url: str, tmp: Path, cache: Path, visitors: list[Visitor], clients: list[Client],
              ring: bool = False) -> dict:  # fmt: skip
    """Every visitor against others: API probes by name, file-route probes by path, and a symlink in the cache.
    By name, each probes about three others (the probes queue like jobs); with `ring`, only the next one (every
    visitor is still probed, and probes, by name), which is all a quick test can afford."""
    leaks: list[str] = []
    probes = own = 0
    for index, (client, visitor) in enumerate(zip(clients, visitors)):
        others = [visitors[(index + 1) % len(visitors)]] if ring else visitors[:: max(1, len(visitors) // 3)]
        for other in others:
            if other is not visitor:
                leaks += api_probes(client, f"v{other.index}")
                probes += 4
        own += f"v{visitor.index}" in list_subjects(client)
    targets = [p for v in visitors for p in private_files(tmp, v.session)]
    link = cache / "troupe-load-test-link"
    if targets:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(targets[0])  # a link inside the served cache to a visitor's private file
    made, file_leaks = file_probes(url, targets, cache)
    made_link, link_leaks = file_probes(url, [str(link)], cache) if targets else (0, [])
    link.unlink(missing_ok=True)
    served = sum(1 for v in visitors for kind in ("image",) if _fetch(url, v.files.get(kind)))
    return {"api_probes": probes, "file_probes": made + made_link, "cross_visitor_reads": len(leaks + file_leaks
            + link_leaks), "leaks": leaks + file_leaks + link_leaks, "own_results_served": served,
            "own_subjects_listed": own}  # fmt: skip


def list_subjects(client: Client) -> list[str]:
    """The names this session's subject pickers list (the event a page load runs to fill them)."""
    return sorted(set(re.findall(r'"(v\d+)"', json.dumps(client.predict("", api_name="/refresh")))))


def _fetch(url: str, path: str | None) -> bool:
    """A visitor's own result through the route its page uses (the control: the route itself works)."""
    if not path:
        return False
    answer = httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=30)
    return answer.status_code == 200 and answer.content == Path(path).read_bytes()


# ------------------------------------------------------------------------------------------------ session end
def wait_until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not check():
        time.sleep(0.1)
    return check()


def session_folders(tmp: Path, session: str) -> list[Path]:
    found = [tmp / "troupe-libraries" / folder_name(session), tmp / "troupe-outputs" / folder_name(session)]
    return [f for f in found if f.exists()]


def rest_visitor(url: str) -> str:
    """A REST client (no heartbeat, so never an unload): save a project through /gradio_api/call; its session id."""
    from studio.ui.forms import GenerateForm  # torch-free: the endpoint's parameters in order

    values = dict(
        asdict(GenerateForm(prompt="a red ball", canvas=CANVAS)), loras={"headers": ["file", "scale"], "data": []}
    )
    session = f"rest-{os.getpid()}-{time.monotonic_ns()}"
    with httpx.Client(timeout=120) as http:
        answer = http.post(f"{url.rstrip('/')}/gradio_api/call/save_project",
                           json={"data": list(values.values()), "session_hash": session})  # fmt: skip
        answer.raise_for_status()
        event = answer.json()["event_id"]
        stream = http.get(f"{url.rstrip('/')}/gradio_api/call/save_project/{event}").text
    if "event: complete" not in stream:
        raise RuntimeError(f"the REST call did not complete: {stream[-300:]}")
    return session


def session_end(url: str, tmp: Path, visitors: list[Visitor], clients: list[Client], idle: float) -> dict:
    """Close every Client (its heartbeat ends: the app's unload runs) and count the folders left; then a REST
    client's folders, which only the idle sweep removes."""
    for client in clients:
        client.close()
    gone = wait_until(lambda: not any(session_folders(tmp, v.session) for v in visitors), 30)
    rest = rest_visitor(url)
    made = bool(session_folders(tmp, rest))
    started = time.monotonic()
    swept = wait_until(lambda: not session_folders(tmp, rest), idle * 3 + 30)
    return {"closed_sessions_cleaned": gone, "rest_folders_made": made, "rest_folders_swept": swept,
            "rest_swept_after_s": round(time.monotonic() - started, 1)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ report
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(visitors: list[Visitor], seconds: float) -> dict:
    timings = [t for v in visitors for t in v.timings]
    waits, latencies = [t.wait for t in timings], [t.latency for t in timings]
    gpu = [t for t in timings if t.kind in ("generate", "register")]
    return {
        "visitors": len(visitors),
        "visitors_finished": sum(1 for v in visitors if not v.errors),
        "jobs": len(timings),
        "gpu_jobs": len(gpu),
        "seconds": round(seconds, 1),
        "jobs_per_minute": round(60 * len(timings) / seconds, 1) if seconds else 0.0,
        "wait_median_s": round(statistics.median(waits), 2) if waits else None,
        "wait_p95_s": round(percentile(waits, 0.95), 2),
        "latency_median_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 0.95), 2),
        "gpu_latency_p95_s": round(percentile([t.latency for t in gpu], 0.95), 2),
        "errors": [e for v in visitors for e in v.errors],
    }


def load_test(url: str, tmp: Path, cache: Path, visitors: int, photo: str, steps: int, preset: str,
              idle: float) -> dict:  # fmt: skip
    """The whole run against a served app whose temporary folder is `tmp` (Gradio's cache: `cache`)."""
    started, leave = time.perf_counter(), threading.Event()
    people, clients = run_visitors(url, visitors, photo, steps, preset, leave, cache)
    report = summary(people, time.perf_counter() - started)
    report["isolation"] = isolation(url, tmp, cache, people, clients)
    leave.set()  # the probes took minutes: the visitors stayed present until now
    report["session_end"] = session_end(url, tmp, people, clients, idle)
    return report


# ------------------------------------------------------------------------------------------------ the app
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_space(tmp: Path, idle_minutes: float, model: str = "demo") -> tuple[subprocess.Popen, str]:
    """app.py as a Space starts it (SPACE_ID set), on 127.0.0.1, with $TMPDIR (and so every visitor's folders and
    Gradio's cache) in `tmp`; returns once it answers."""
    port = free_port()
    env = {**os.environ, "SPACE_ID": "local/load-test", "TMPDIR": str(tmp), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "TROUPE_IDLE_MINUTES": str(idle_minutes), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gradio")}  # fmt: skip
    log = open(tmp / "app.log", "w")  # noqa: SIM115 - open for the app's lifetime
    app = subprocess.Popen([sys.executable, "app.py", "--model", model], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    if not wait_until(lambda: app.poll() is not None or _answers(url), 600) or app.poll() is not None:
        raise RuntimeError(f"the app did not start: see {tmp / 'app.log'}")
    return app, url


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def demo_photo(folder: Path) -> str:
    """A red ball on grass: the demo world's own kind of subject."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), (110, 170, 90))
    ImageDraw.Draw(image).ellipse((20, 20, 76, 76), fill=(215, 40, 40))
    image.save(folder / "ball.png")
    return str(folder / "ball.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of each generation")
    parser.add_argument("--preset", default="quick", help="registration preset (instant, quick...)")
    parser.add_argument(
        "--idle-minutes",
        type=float,
        default=0.5,
        help="the app's idle expiry for this run (shorter than a queue wait: a queued visitor must not expire)",
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="troupe-load-") as folder:
        tmp = Path(folder)
        app, url = start_space(tmp, args.idle_minutes, args.model)
        try:
            report = load_test(url, tmp, tmp / "gradio", args.visitors, demo_photo(tmp), args.steps, args.preset,
                               args.idle_minutes * 60)  # fmt: skip
        finally:
            app.terminate()
            app.wait(timeout=30)
    print(json.dumps(report, indent=1) if args.json else _table(report))
    ok = report["visitors_finished"] == args.visitors and report["isolation"]["cross_visitor_reads"] == 0
    return 0 if ok and report["session_end"]["closed_sessions_cleaned"] else 1


def _table(report: dict) -> str:
    lines = [f"{k}: {v}" for k, v in report.items() if not isinstance(v, dict)]
    for section in ("isolation", "session_end"):
        lines += [f"{section}.{k}: {v}" for k, v in report[section].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
