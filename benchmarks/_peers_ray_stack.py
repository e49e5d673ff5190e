"""The Ray Serve stack of ``peers.py``, from the driver's side: it starts the Ray client script
(``benchmarks._peers_ray``) in the Ray virtualenv, which starts the local cluster and deploys the model, and
talks to it one JSON command per line."""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._batching_model import BATCH_SIZE
from benchmarks._peers_stack import INPUT_POOL, PROCESSES, OpenLoop, Stack
from benchmarks._peers_venvs import peer_env
from benchmarks.harness import REPO, Worker, check_outputs, descendants, proc_cpu_s

RAY_MAX_ONGOING = 2 * BATCH_SIZE  # max_ongoing_requests per replica: one batch running, one filling
RAY_REPLY = "@@peers "  # prefix of the Ray client's replies on its stdout
RAY_TIMEOUT = 300.0  # seconds for the Ray client to start the cluster and deploy, or to answer a command


class RayStack(Stack):
    """The Ray client script (``benchmarks._peers_ray``) in the Ray virtualenv: it starts the local cluster as its
    own children, deploys the model and runs the commands it is sent; it is the client, its children the worker."""

    label = "ray_serve"
    module = "benchmarks._peers_ray"  # the client script, run as ``python -m module``

    def __init__(self, proc: subprocess.Popen[str], log_path: Path, replies: queue.Queue[str | None],
                 hello: dict[str, Any], ready_s: float) -> None:
        self.proc, self.log_path, self.replies, self.ready_s = proc, log_path, replies, ready_s
        self.paths = ["ray_serve"]
        self.settings = dict(hello.get("settings", {}))
        self.replica_pids: list[int] = list(hello.get("replica_pids", []))
        self.seen = self.tree()  # every process of the cluster seen so far: killed if one outlives the client
        self.stop_s: float | None = None
        self.left_behind: int | None = None

    @classmethod
    @contextlib.contextmanager
    def started(cls, python: str, broker: str, log_dir: Path, args: list[str] | None = None,
                **env: str) -> Iterator[RayStack]:
        """Start the client (and so the cluster); always stop both on the way out (leftovers killed). ``args``
        replace the client's default arguments (``--temp-dir`` is added); ``env`` is added to its environment."""
        log_path = log_dir / "ray-serve.log"
        temp_dir = Path(tempfile.mkdtemp(prefix="peers-ray-"))  # short: Ray puts unix sockets under it
        if args is None:
            args = ["--replicas", str(PROCESSES), "--num-cpus", str(PROCESSES), "--max-ongoing", str(RAY_MAX_ONGOING),
                    "--pool", str(INPUT_POOL)]
        cmd = [python, "-m", cls.module, *args, "--temp-dir", str(temp_dir)]
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=peer_env(broker, RAY_USAGE_STATS_ENABLED="0", **env),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    bufsize=1, start_new_session=True)
        # harness.Worker for its stop(): SIGTERM, SIGKILL after a while, then whatever outlived it is killed.
        holder = Worker(proc, "ray-serve", log_path)  # type: ignore[arg-type]
        stack: RayStack | None = None
        try:
            replies: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(proc, replies, log_path), daemon=True).start()
            hello = _next_reply(proc, replies, log_path, RAY_TIMEOUT)
            stack = cls(proc, log_path, replies, hello, time.monotonic() - started)
            print(f"  Ray Serve ready after {stack.ready_s:.1f}s; replicas {stack.replica_pids}", flush=True)
            yield stack
        finally:
            holder.pids |= descendants(proc.pid) | (stack.seen if stack is not None else set())
            stopping = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                    proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)  # serve.shutdown() and ray.shutdown()
            holder.stop()
            if stack is not None:  # from the stop command until the client (and the cluster) exited
                stack.stop_s, stack.left_behind = round(time.monotonic() - stopping, 2), holder.left_behind
            shutil.rmtree(temp_dir, ignore_errors=True)

    def request(self, command: dict[str, Any], timeout: float = RAY_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = _next_reply(self.proc, self.replies, self.log_path, timeout)
        if "error" in answer:
            raise RuntimeError(f"Ray client: {answer['error']}")
        self.seen |= self.tree()
        return answer

    def tree(self) -> set[int]:
        return descendants(self.proc.pid)

    def client_cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def batch_counters(self, path: str) -> tuple[int, int] | None:
        answer = self.request({"cmd": "stats", "replicas": PROCESSES})
        return int(answer["items"]), int(answer["batches"])

    def warm_up(self, count: int) -> list[float]:
        return [float(v) for v in self.request({"cmd": "warmup", "count": count})["values"]]

    def throughput(self, path: str, items: list[list[float]]) -> tuple[float, list[float]]:
        answer = self.request({"cmd": "throughput", "count": len(items)})
        return float(answer["seconds"]), [float(v) for v in answer["values"]]

    def open_loop(self, path: str, inputs: list[list[float]], rate: float, count: int) -> OpenLoop:
        answer = self.request({"cmd": "open_loop", "rate": rate, "count": count},
                              timeout=RAY_TIMEOUT + count / rate)
        return OpenLoop([float(v) for v in answer["latencies_s"]], [float(v) for v in answer["lag_s"]],
                        [float(v) for v in answer["values"]])


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None], log_path: Path) -> None:
    """The Ray client's stdout: replies to ``lines``, anything else to its log; None once it closes."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RAY_REPLY):
            lines.put(line[len(RAY_REPLY):])
        else:
            with open(log_path, "a") as log:
                log.write(line)
    lines.put(None)


def _next_reply(proc: subprocess.Popen[str], lines: queue.Queue[str | None], log_path: Path,
                timeout: float) -> dict[str, Any]:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no answer from the Ray client in {timeout:.0f}s:\n{_tail(log_path)}") from None
    if line is None:
        raise RuntimeError(f"the Ray client exited ({proc.poll()}):\n{_tail(log_path)}")
    reply: dict[str, Any] = json.loads(line)
    return reply


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def ray_stack(url: str, python: str, reference: list[float], warmup: int, log_dir: Path) -> Iterator[RayStack]:
    """The Ray Serve stack, started and warmed up (``warmup`` items after every input, every output checked)."""
    print("  starting a local Ray cluster and deploying (the first start takes a while) ...", flush=True)
    with RayStack.started(python, url, log_dir) as stack:
        check_outputs("ray_serve warm-up", stack.warm_up(warmup), reference)
        yield stack
