"""The CNI runtime stand-in the tests drive real plugin chains with: it lives in lab/cni.py (the lab
creates its ``--cni`` pods with it); re-exported here for the tests that import it from this path."""

from lab.cni import Attachment, CniPluginError, CniRuntime

__all__ = ["Attachment", "CniPluginError", "CniRuntime"]
