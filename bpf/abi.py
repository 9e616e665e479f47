"""Python mirror of bpf/capture.h: slots, map names and value layouts shared with the sk_lookup program.

tests/kernel/test_abi.py parses capture.h and fails if this file drifts from it. Change both together
and bump ABI_VERSION.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

ABI_VERSION = 1
HBONE_PORT = 15008

# zt_listeners slots
SLOT_OUTBOUND = 0
SLOT_INBOUND = 1
SLOT_HBONE = 2
SLOT_COUNT = 3
SLOT_NAMES = {SLOT_OUTBOUND: "outbound", SLOT_INBOUND: "inbound", SLOT_HBONE: "hbone"}

MAX_POD_IPS = 8192
MAX_IFACES = 4096

# zt_counters
CNT_OUTBOUND = 0
CNT_INBOUND = 1
CNT_HBONE = 2
CNT_DROP_SPOOF = 3
CNT_DROP_NO_LISTENER = 4
CNT_DROP_ASSIGN = 5
CNT_PASS = 6
CNT_COUNT = 8
COUNTER_NAMES = {
    CNT_OUTBOUND: "outbound",
    CNT_INBOUND: "inbound",
    CNT_HBONE: "hbone",
    CNT_DROP_SPOOF: "drop_spoof",
    CNT_DROP_NO_LISTENER: "drop_no_listener",
    CNT_DROP_ASSIGN: "drop_assign",
    CNT_PASS: "pass",
}

# zt_meta
META_ABI = 0
META_HBONE_PORT = 1
META_COUNT = 4

# Map names in the C source, which are also the pin names under the pin directory.
MAP_LISTENERS = "zt_listeners"
MAP_POD_IPS = "zt_pod_ips"
MAP_IFACES = "zt_ifaces"
MAP_COUNTERS = "zt_counters"
MAP_META = "zt_meta"
ALL_MAPS = (MAP_LISTENERS, MAP_POD_IPS, MAP_IFACES, MAP_COUNTERS, MAP_META)
LINK_PIN = "link"
PROG_NAME = "zt_sk_lookup"

# Kernel constants BCC 0.26 (and Debian's 6.1 headers for some) do not name.
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36  # bpf_attach_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_SOCKMAP = 15
BPF_LINK_TYPE_NETNS = 5
SK_DROP = 0
SK_PASS = 1

# Expected (type, key_size, value_size, max_entries) of each map: checked when opening pins so a
# restarted agent never writes one layout into another.
MAP_LAYOUT = {
    MAP_LISTENERS: (BPF_MAP_TYPE_SOCKMAP, 4, 8, SLOT_COUNT),
    MAP_POD_IPS: (BPF_MAP_TYPE_HASH, 4, 8, MAX_POD_IPS),
    MAP_IFACES: (BPF_MAP_TYPE_HASH, 4, 8, MAX_IFACES),
    MAP_COUNTERS: (BPF_MAP_TYPE_ARRAY, 4, 8, CNT_COUNT),
    MAP_META: (BPF_MAP_TYPE_ARRAY, 4, 8, META_COUNT),
}

SOURCE_DIR = Path(__file__).resolve().parent
PROGRAM_SOURCE = SOURCE_DIR / "capture.c"
HEADER = SOURCE_DIR / "capture.h"


class PodIpValue(ctypes.Structure):
    """struct zt_pod_ip"""

    _fields_ = (("ifindex", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class IfaceValue(ctypes.Structure):
    """struct zt_iface"""

    _fields_ = (("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32))
