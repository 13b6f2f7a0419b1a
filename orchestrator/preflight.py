"""Reachability checks run before anything starts, so a typo in an address fails in a second, not after Ray boots."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
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
    if parsed.scheme == "gcs":
        _join_with_token_if_required(f"{parsed.hostname}:{port or default}", address)


def _gcs_accepts(gcs_address: str) -> bool:
    """Whether the cluster's GCS answers this process with its current token settings (False: it refused the
    token, or the lack of one). Ray has no public call for this; InnerGcsClient.standalone is the client
    ray.init uses, with a timeout instead of ray.init's ~25 s of retries before a ConnectionError."""
    from ray._raylet import InnerGcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_stderr():  # its C++ side logs each refused attempt; the refusal is reported here
            InnerGcsClient.standalone(gcs_address, None, int(CONNECT_TIMEOUT_S * 1000))
    except AuthenticationError:
        return False
    except Exception:  # anything else (not a GCS, busy): ray.init reports it in its own words
        return True
    return True


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block: native code writes there directly, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _join_with_token_if_required(gcs_address: str, address: str) -> None:
    """Ray 2.60's `ray start --head` turns token authentication on (when a token exists on the head), but a
    driver joining an explicit address sends its token only with RAY_AUTH_MODE=token. When the cluster wants
    a token, RAY_AUTH_MODE is unset and this machine has one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), use it, as Ray itself does for `address="auto"`; otherwise say what to set."""
    from ray._private.authentication.authentication_token_setup import (
        AUTH_MODE_ENV_VAR,
        maybe_enable_token_auth_if_token_available,
    )
    from ray.exceptions import AuthenticationError

    if _gcs_accepts(gcs_address):
        return
    mode = os.environ.get(AUTH_MODE_ENV_VAR)
    if mode is None:
        try:
            enabled = maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except AuthenticationError:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file: no usable token
            enabled = False
        if enabled:
            if _gcs_accepts(gcs_address):
                return
            mode = "token"
    problem = (
        "rejected this machine's token"
        if mode == "token"
        else f"requires token authentication ({AUTH_MODE_ENV_VAR} is {mode or 'unset'} here)"
    )
    raise QuailoraInputError(
        f"--address {address!r}: the Ray cluster {problem}; export {AUTH_MODE_ENV_VAR}=token and put the "
        "cluster's token (on the head: ~/.ray/auth_token, or `ray get-auth-token`) in ~/.ray/auth_token, "
        "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
    )


HOST_REFUSED = "Invalid Host header"  # what `mlflow server` answers a Host it does not allow (3.x)


def _check_mlflow_server(uri: str) -> None:
    """MLflow servers answer `GET /health`; a bare TCP connect is not enough (a proxy or another service may
    accept it). /health answers any Host header, its API only those `--allowed-hosts` names (by default
    localhost and private addresses): so one API call too, or trials fail with 403 after their stages ran."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=CONNECT_TIMEOUT_S):
            pass
        with urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout=CONNECT_TIMEOUT_S
        ):
            return
    except urllib.error.HTTPError as exc:
        if exc.code == 403 and HOST_REFUSED in exc.read().decode(errors="replace"):
            raise QuailoraInputError(
                f"tracking_uri {uri!r}: the MLflow server refuses the Host header {urlparse(uri).netloc!r}; "
                f"start it with --allowed-hosts {urlparse(uri).netloc}"
            ) from None
        if exc.code in (401, 403):  # an authenticating server is still a server
            return
        problem = f"HTTP {exc.code} from {exc.url}, not an MLflow tracking server"
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
