"""The names callers have imported from ``mesh.config`` since the config ring moved here.

The model is in mesh/model.py, the parser in mesh/parse.py, errors in mesh/errors.py, the
strict YAML loader in mesh/yamlstrict.py, name rules in mesh/names.py; reading and watching the
file moved to the asyncio ring (sources/file.py: ``load_config``, ``FileConfigSource``).
New code should import from those modules.
"""

from __future__ import annotations

from mesh.errors import ChangeRefused, ConfigError, ConfigIssue
from mesh.model import (
    API_VERSION,
    MESH_KIND,
    POLICY_API_VERSIONS,
    POLICY_KINDS,
    IPAddress,
    IPNetwork,
    MeshConfig,
    Node,
    PolicyDocument,
    Service,
    ServicePort,
    Snapshot,
    Waypoint,
    Workload,
    parse_ip,
    thaw,
)
from mesh.parse import PolicyParser, default_policy_parser, parse_config

__all__ = [
    "API_VERSION",
    "MESH_KIND",
    "POLICY_API_VERSIONS",
    "POLICY_KINDS",
    "ChangeRefused",
    "ConfigError",
    "ConfigIssue",
    "IPAddress",
    "IPNetwork",
    "MeshConfig",
    "Node",
    "PolicyDocument",
    "PolicyParser",
    "Service",
    "ServicePort",
    "Snapshot",
    "Waypoint",
    "Workload",
    "default_policy_parser",
    "parse_config",
    "parse_ip",
    "thaw",
]
