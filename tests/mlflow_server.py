"""A real `mlflow server` on loopback for the tests that need tracking shared between processes or nodes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.ports import free_port


def server_command(host: str, port: int, root: Path, *options: str) -> list[str]:
    """`mlflow server` with one worker, its SQLite store and proxied artifacts under `root`."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return [str(mlflow_bin), "server", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
            str(root / "artifacts"), *options]  # fmt: skip


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A server on loopback (server_command); yields the http:// URI, ends it after."""
    port = free_port()
    proc = subprocess.Popen(
        server_command("127.0.0.1", port, root),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not come up") from None
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
