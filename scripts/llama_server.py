"""Start a local OpenAI-compatible server for the bundled policy: llama-cpp-python's ``llama_cpp.server`` on
the bundled SmolLM2 GGUF (install: ``bash scripts/install_server.sh``, which caches the built wheel).

A development tool, not part of the installed package: the serving-backend tests and benchmark import it
(``tests/conftest.py`` and ``benchmarks/_common.py`` put ``scripts/`` on the path). By hand::

    python scripts/llama_server.py --port 8000          # serves until interrupted
    moalign generate --backend server --base-url http://127.0.0.1:8000/v1 --method cd ...

llama-cpp-python (0.3.36) takes text prompts only and returns one choice per request: the client uses its
text fallback there (see :mod:`moalign.decoding.completions`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from moalign.errors import MoalignError
from moalign.policies import bundled_gguf


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_available() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette")
    )


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1 (a free port unless given), started and stopped by hand
    (:meth:`start`, :meth:`stop`) or as a context manager; :attr:`base_url` is its ``/v1`` URL.

    ``n_batch=1`` makes it deterministic: llama.cpp reuses the KV cache of the longest prefix it shares with
    the previous request, and a token's logits then depend (in the last bits) on how many tokens were
    evaluated together, so the same seeded request can sample differently after different earlier requests.
    One token per batch computes every token the same way whatever was cached (prompts evaluate slower).
    """

    def __init__(
        self,
        gguf: str | Path | None = None,
        *,
        alias: str = "smollm2",
        port: int | None = None,
        n_ctx: int = 2048,
        n_threads: int = 1,
        n_batch: int | None = None,
        log: str | Path | None = None,
        extra: list[str] | None = None,
    ):
        self.gguf = Path(gguf) if gguf is not None else bundled_gguf()
        self.alias, self.n_ctx, self.n_threads, self.n_batch = alias, n_ctx, n_threads, n_batch
        self.port = port or free_port()
        self.log = Path(log) if log is not None else None
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if not llama_cpp_available():
            raise MoalignError("llama-cpp-python[server] is not installed: bash scripts/install_server.sh")
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
            "--interrupt_requests", "False", "--verbose", "False", *self.extra,
        ]  # fmt: skip
        if self.n_batch is not None:
            cmd += ["--n_batch", str(self.n_batch), "--n_ubatch", str(self.n_batch)]
        return cmd

    def environment(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": str(self.n_threads)}

    def start(self, timeout: float = 120.0) -> LlamaServer:
        cmd, env = self.command(), self.environment()
        out = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if self.log is not None:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MoalignError(f"{cmd[0]} exited with status {self.proc.returncode} (log: {self.log})")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if json.loads(r.read()).get("data"):
                        return self
            except urllib.error.HTTPError:
                return self  # it answers (e.g. 401 with --api_key)
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        self.stop()
        raise MoalignError(f"llama_cpp.server did not answer on {self.base_url} within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NativeLlamaServer(LlamaServer):
    """llama.cpp's own ``llama-server`` binary (``scripts/install_llama_cpp.sh`` builds it): ``parallel`` slots
    decoded together (continuous batching), token-id prompts, ``n`` choices and the generated token ids, i.e.
    the ``token_ids`` and ``n`` capabilities of the client."""

    def __init__(self, binary: str | Path, *, parallel: int = 8, n_ctx: int = 8192, **kw):
        super().__init__(n_ctx=n_ctx, **kw)
        self.binary, self.parallel = Path(binary), int(parallel)

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.gguf), "--alias", self.alias, "--host", "127.0.0.1",
               "--port", str(self.port), "-c", str(self.n_ctx), "-t", str(self.n_threads), "-tb",
               str(self.n_threads), "-np", str(self.parallel), *self.extra]  # fmt: skip
        if self.n_batch is not None:
            cmd += ["-b", str(self.n_batch), "-ub", str(self.n_batch)]
        return cmd

    def environment(self) -> dict:
        env = super().environment()
        env["LD_LIBRARY_PATH"] = f"{self.binary.parent}:{env.get('LD_LIBRARY_PATH', '')}"
        return env


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="serve the bundled policy's GGUF with llama_cpp.server")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    a = ap.parse_args()
    srv = LlamaServer(port=a.port, n_threads=a.threads, n_ctx=a.n_ctx).start()
    print(f"serving {srv.gguf.name} as 'smollm2' at {srv.base_url} (Ctrl-C stops it)", flush=True)
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
