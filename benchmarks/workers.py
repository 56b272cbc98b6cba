"""Engines in subprocesses: one engine per child process, one line protocol.

Every benchmark that measures an engine runs it in a child process of its own (a clean GPU,
its own OpenMP runtime and allocator), through this module:

* parent: ``spawn(script, task, ...)`` writes ``task`` (a JSON-able dict) to a temporary file
  and runs ``python SCRIPT --worker FILE``;
* child: the script's ``main`` hands ``FILE`` to ``serve_worker(fn, FILE)``, which runs
  ``fn(task)`` and sends the dict it returns back.

The child talks to the parent on stdout, one line a message::

    @vllm-sink KIND JSON

``KIND`` is ``result`` (the worker's answer: a dict), ``progress`` (a number, e.g. tokens done
since the last ``progress``; negative to take some back) or ``note`` (anything, for the user).
Every other line (the engine's own logging) is shown through ``echo`` and kept in a tail. The
child has succeeded when a ``result`` came, whatever its exit status after it (vLLM's teardown
can abort once the engine is shut down).

``wait_healthy`` is the same idea for a server child (``vllm serve``): wait for ``/health``;
``vllm_serve`` starts one and waits, ``stop_group`` stops it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

PREFIX = "@vllm-sink "
TAIL_LINES = 40


def emit(kind: str, payload) -> None:
    """Child -> parent: one protocol line on stdout, flushed."""
    sys.stdout.write(f"{PREFIX}{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def serve_worker(fn: Callable[[dict], dict], task_path: str) -> dict:
    """In the child: run ``fn`` on the task in ``task_path``, emit its result; return the task."""
    task = json.loads(Path(task_path).read_text())
    emit("result", fn(task))
    return task


class Progress:
    """Throttled ``progress`` messages from a worker (tokens generated since the last one)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.pending, self.last = every_s, 0, time.monotonic()
        self.run_total = 0

    def undo_run(self) -> None:
        """Take back the tokens of an aborted run."""
        self.flush()
        if self.run_total:
            emit("progress", -self.run_total)
        self.run_total = 0

    def add(self, n: int) -> None:
        self.run_total += n
        self.pending += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            emit("progress", self.pending)
            self.pending, self.last = 0, now

    def flush(self) -> None:
        if self.pending:
            emit("progress", self.pending)
            self.pending = 0


class WorkerFailed(RuntimeError):
    """The child sent no result: ``why`` (``timed out`` or ``exit N``), ``tail`` its last lines."""

    def __init__(self, label: str, why: str, tail: list[str]):
        self.why, self.tail = why, tail
        super().__init__(f"the {label} worker failed ({why})" + "".join(f"\n    {x}" for x in tail[-10:]))


def echo_errors(line: str) -> None:
    """An ``echo`` for engine logs: only the lines that look like errors."""
    if "Error" in line or "error" in line[:80] or "Traceback" in line:
        print("   ", line[:300], flush=True)


def spawn(script: str | Path, task: dict, *, env: dict | None = None, timeout: float | None = None,
          on_progress: Callable | None = None, on_note: Callable | None = None,
          echo: Callable[[str], None] | None = echo_errors, stderr=subprocess.STDOUT,
          new_session: bool = False, label: str = "") -> dict:
    """In the parent: run ``python SCRIPT --worker TASKFILE`` and return its result.

    ``env``: the child's environment (default: this one). ``timeout``: seconds, then the child
    is killed (its whole process group with ``new_session``, which also ends an engine's own
    worker processes). ``on_progress``/``on_note``: called with each such payload. ``echo``:
    called with every other line (``None``: silent). ``stderr``: where the child's stderr goes
    (default: into the parsed stdout; a file, or ``None`` for this process's stderr).
    Raises :class:`WorkerFailed` when no result came."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="vllm-sink-task-", delete=False) as f:
        json.dump(task, f)
    proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--worker", f.name], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=new_session)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL) if new_session else proc.kill()
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    result, tail = None, collections.deque(maxlen=TAIL_LINES)
    handlers = {"progress": on_progress, "note": on_note}
    try:
        for line in proc.stdout:
            at = line.find(PREFIX)
            if at >= 0:
                kind, _, body = line[at + len(PREFIX):].partition(" ")
                payload = json.loads(body)
                if kind == "result":
                    result = payload
                elif handlers.get(kind):
                    handlers[kind](payload)
                continue
            tail.append(line.rstrip()[:400])
            if echo:
                echo(line.rstrip())
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
        os.unlink(f.name)
    if result is None:
        raise WorkerFailed(label or Path(script).stem, "timed out" if timed_out.is_set() else f"exit {rc}", list(tail))
    return result


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Poll ``url/health`` every 2 s until it answers 200; the seconds that took. Raises, with
    the end of the server's ``log``, when ``proc`` exits first or ``timeout`` passes."""
    import requests

    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - start
        except requests.RequestException:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve did not start in {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


def vllm_serve(model: Path, flags: list[str], port: int, log: Path, *, served: str,
               python: str | None = None) -> subprocess.Popen:
    """``vllm serve`` of the environment of ``python`` (default: this interpreter's; else
    the one on PATH), in a process group of its own, once it answers ``/health``."""
    beside = Path(python or sys.executable).parent / "vllm"
    cmd = [str(beside) if beside.exists() else "vllm", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", served, "--disable-uvicorn-access-log", *flags]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=tempfile.gettempdir())
    wait_healthy(proc, f"http://127.0.0.1:{port}", log, timeout=900)
    return proc


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in a process group of its own: TERM, then KILL after 120 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def prometheus_values(text: str) -> dict[str, float]:
    """``name{labels} value`` lines of a /metrics page, summed over label sets per name."""
    import re

    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def scrape_metrics(url: str) -> dict[str, float]:
    """A server's ``/metrics`` as ``prometheus_values``."""
    import requests

    return prometheus_values(requests.get(url + "/metrics", timeout=30).text)


def plugin_rev() -> str | None:
    """The plugin's commit: ``$VLLM_SINK_REV`` (set where the tree has no .git, as on the
    GPU machine), else ``git rev-parse`` of this checkout."""
    if os.environ.get("VLLM_SINK_REV"):
        return os.environ["VLLM_SINK_REV"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """What a results file records of its run: the plugin's commit, the command (``python
    benchmarks/SCRIPT ARGS``) and the date."""
    args = sys.argv[1:] if argv is None else argv
    return dict(plugin=plugin_rev(), command=" ".join([f"python benchmarks/{Path(script).name}", *args]),
                date=time.strftime("%Y-%m-%d"))


def write_results(out: Path, doc: dict, table: list[str]) -> None:
    """``doc`` as JSON at ``out``, and the markdown ``table`` beside it (``.md``), printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def line_plot(png: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str) -> None:
    """One line per ``label: (xs, ys)`` of ``series``, saved to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
