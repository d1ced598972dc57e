"""A `padrec serve` child process on free loopback ports: start, wait until ready, stop, see what it left."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) holding padrec_serve


def serve_python() -> str | None:
    """An interpreter that can run the server: this one if it has PyTriton, else the set-up's .venv-serve (a
    checkout's), else None."""
    probe = "import importlib.util as u; assert u.find_spec('pytriton')"
    for py in (sys.executable, str(ROOT / ".venv-serve" / "bin" / "python")):
        if Path(py).exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
            return py
    return None


def rss_mib(pids) -> float:
    """Resident memory of these processes together, MiB."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def descendants(pid: int) -> set:
    """Process ids below `pid` (from /proc)."""
    children: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class ServerProcess:
    """A `padrec serve` child process and where it listens."""

    proc: subprocess.Popen
    ports: dict  # http, grpc, metrics
    log: Path
    pids: set = field(default_factory=set)  # the server and every process it started, seen while it ran

    @property
    def http(self) -> str:
        return f"localhost:{self.ports['http']}"

    @property
    def grpc(self) -> str:
        return f"localhost:{self.ports['grpc']}"

    def get(self, port_name: str, path: str) -> str:
        with urllib.request.urlopen(f"http://localhost:{self.ports[port_name]}{path}", timeout=10) as r:
            return r.read().decode()

    def stats(self) -> dict:
        return json.loads(self.get("http", "/v2/models/padrec/stats"))

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then wait for the server and its children to exit; the exit code."""
        self.pids |= {self.proc.pid} | descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        end = time.time() + timeout_s
        while time.time() < end and any(alive(p) for p in self.pids):
            time.sleep(0.2)
        return code


def start_server(engine_dir, log: Path, python: str, *args, ready_s: float = 240) -> ServerProcess:
    """`padrec serve` on free ports; returns once Triton reports the model ready."""
    http, grpc, metrics = free_ports(3)
    cmd = [python, "-m", "padrec_export.cli", "serve", "--engines", str(engine_dir), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), *args]
    # this checkout first, then whatever the caller put on the path (staged wheels on a GPU machine)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = ServerProcess(proc, {"http": http, "grpc": grpc, "metrics": metrics}, log)
    end = time.time() + ready_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"padrec serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            server.get("http", "/v2/models/padrec/ready")
            server.pids |= {proc.pid} | descendants(proc.pid)
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"padrec serve not ready after {ready_s} s:\n{log.read_text()[-4000:]}")
