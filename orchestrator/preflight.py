"""Reachability checks run before anything starts, so a typo in an address fails in a second, not after Ray boots."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from quailora.errors import QuailoraInputError

CONNECT_TIMEOUT_S = 3.0
RAY_GCS_DEFAULT_PORT = 6379
RAY_CLIENT_DEFAULT_PORT = 10001


def _connect(host: str, port: int, *, what: str, value: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise QuailoraInputError(
            f"{what} {value!r}: cannot connect to {host}:{port} ({exc.strerror or exc})"
        ) from None


def check_ray_address(address: str | None) -> None:
    """`host:port` (GCS) or `ray://host:port` (Ray Client) must accept a TCP connection; None or 'auto' is left to Ray."""
    if address in (None, "", "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.scheme not in ("gcs", "ray") or not parsed.hostname:
        raise QuailoraInputError(f"--address {address!r}: expected host:port or ray://host:port")
    try:
        port = parsed.port
    except ValueError:
        raise QuailoraInputError(f"--address {address!r}: the port is not a number") from None
    default = RAY_CLIENT_DEFAULT_PORT if parsed.scheme == "ray" else RAY_GCS_DEFAULT_PORT
    _connect(parsed.hostname, port or default, what="--address", value=address)


def _check_mlflow_server(uri: str) -> None:
    """MLflow servers answer `GET /health`; a bare TCP connect is not enough (a proxy or another service may accept it)."""
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # an authenticating server is still a server
            return
        problem = f"HTTP {exc.code} from {url}, not an MLflow tracking server"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        problem = f"cannot connect ({getattr(reason, 'strerror', None) or reason})"
    raise QuailoraInputError(f"tracking_uri {uri!r}: {problem}")


def check_tracking_uri(uri: str) -> None:
    """An http(s) MLflow server must answer its health check; a sqlite/file store needs a creatable directory."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise QuailoraInputError(f"tracking_uri {uri!r}: no host")
        _check_mlflow_server(uri)
    elif parsed.scheme in ("sqlite", "file", ""):
        local = uri.removeprefix("sqlite:///").removeprefix("file://") if parsed.scheme else uri
        directory = Path(local).parent if parsed.scheme == "sqlite" else Path(local)
        existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
        if existing is None or not existing.is_dir():
            raise QuailoraInputError(f"tracking_uri {uri!r}: {directory} cannot be created")
