"""Start and stop a real SGLang HTTP server (``python -m sglang.launch_server``) for the benchmarks
and the tests that need one.

The server runs in its own process group / session: SGLang's SIGQUIT handler kills its *own*
process tree when a child dies (``kill_process_tree(os.getpid())``), which must never reach the
caller (pytest, a benchmark driver). ``SGLangServer`` is a context manager:

    with SGLangServer(model, ["--kv-policy", "snapkv", "--kv-budget", "0.3"], log_path=p) as srv:
        requests.post(srv.url + "/generate", json=...)
        info = srv.server_info()

On CPU (``on_cpu=True``, the default when CUDA is absent) it adds what SGLang needs on this machine
(``--device cpu``, ``--disable-cuda-graph``, ``--mem-fraction-static``) and the environment of
``scripts/cpu-env.sh``; the caller must still pass ``--max-total-tokens`` (else the CPU platform
sizes the pool from free RAM, see ../shared/design/sglang-on-cpu.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "TRITON_INTERPRET": "1",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


class ServerError(RuntimeError):
    """The server did not come up, or died; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch: certainly no CUDA server
        return False


def http_json(url: str, payload: Optional[dict] = None, timeout: float = 600.0) -> dict:
    """GET (payload None) or POST JSON; returns the decoded JSON body."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else {}


class SGLangServer:
    def __init__(self, model_path: str, args: Sequence[str] = (), *, port: Optional[int] = None,
                 log_path: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
                 on_cpu: Optional[bool] = None, start_timeout: float = 600.0, python: str = sys.executable,
                 cwd: Optional[Path] = None):
        self.model_path = str(model_path)
        self.cwd = None if cwd is None else str(cwd)  # relative paths in ``args`` resolve against it
        self.args = [str(a) for a in args]
        self.port = int(port) if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path is not None else None
        self.on_cpu = (not _cuda_available()) if on_cpu is None else bool(on_cpu)
        self.start_timeout = float(start_timeout)
        self.python = python
        self.extra_env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    # --- command line -----------------------------------------------------------------------------
    def command(self) -> List[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", "127.0.0.1", "--port", str(self.port)]
        given = set(a for a in self.args if a.startswith("--"))
        if self.on_cpu:
            for flag, value in (("--device", "cpu"), ("--mem-fraction-static", "0.3")):
                if flag not in given:
                    cmd += [flag, value]
            if "--disable-cuda-graph" not in given:
                cmd.append("--disable-cuda-graph")
        return cmd + self.args

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        if self.on_cpu:
            env.update(CPU_ENV)
        env.update(self.extra_env)
        return env

    # --- life cycle -------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> "SGLangServer":
        """Launch the server; with ``wait`` (default) block until it answers (``wait_ready``)."""
        if self.proc is not None:
            raise ServerError("server already started")
        if self.on_cpu and "--max-total-tokens" not in self.args:
            raise ServerError("on CPU pass --max-total-tokens (else SGLang sizes the KV pool from free RAM)")
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
            self._log.write("$ " + " ".join(self.command()) + "\n")
            self._log.flush()
            out = self._log
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.cwd)
        if not wait:
            return self
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} during start-up\n{self.log_tail()}")
            try:
                http_json(self.url + "/get_model_info", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        raise ServerError(f"server not ready after {self.start_timeout:.0f} s\n{self.log_tail()}")

    def wait_for_log(self, pattern: str, timeout: float) -> "re.Match":
        """Block until the server log matches the regex ``pattern`` (e.g. a start-up line printed before
        the server is ready); ServerError if the server exits or ``timeout`` passes first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + float(timeout)
        while True:
            text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
            m = rx.search(text)
            if m:
                return m
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} before logging {pattern!r}\n"
                                  f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"{pattern!r} not in the server log after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=timeout)
        else:  # the server itself is gone; its children may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- queries ----------------------------------------------------------------------------------
    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def server_info(self) -> dict:
        return http_json(self.url + "/get_server_info", timeout=60)

    def max_total_num_tokens(self) -> Optional[int]:
        info = self.server_info()
        v = info.get("max_total_num_tokens")
        if v is None:
            v = (info.get("internal_states") or [{}])[0].get("max_total_num_tokens")
        return None if v is None else int(v)

    def generate(self, payload: dict, timeout: float = 600.0) -> dict:
        return http_json(self.url + "/generate", payload, timeout=timeout)
