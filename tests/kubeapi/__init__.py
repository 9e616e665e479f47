"""A stand-in Kubernetes API server for tests (see README.md in this folder)."""

from .harness import ApiServerProcess, RunningApiServer, running, start, write_kubeconfig
from .server import ApiError, KubeApiServer

__all__ = [
    "ApiError",
    "ApiServerProcess",
    "KubeApiServer",
    "RunningApiServer",
    "running",
    "start",
    "write_kubeconfig",
]
