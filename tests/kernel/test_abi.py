"""bpf/abi.py must mirror bpf/capture.h exactly (no kernel needed)."""

from __future__ import annotations

import ctypes
import re

from bpf import abi

HEADER = abi.HEADER.read_text()


def header_defines() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define\s+(ZT_\w+)\s+(\d+)", HEADER, re.M)}


def test_every_header_constant_is_mirrored() -> None:
    defines = header_defines()
    assert defines, "no ZT_ constants parsed from capture.h"
    for name, value in defines.items():
        py = name.removeprefix("ZT_")
        assert hasattr(abi, py), f"abi.py lacks {py} (capture.h {name})"
        assert getattr(abi, py) == value, f"abi.{py} = {getattr(abi, py)} but capture.h {name} = {value}"


def test_struct_layouts_match() -> None:
    for cname, pyclass in (("zt_pod_ip", abi.PodIpValue), ("zt_iface", abi.IfaceValue)):
        body = re.search(rf"struct {cname} \{{(.*?)\}};", HEADER, re.S)
        assert body, cname
        fields = re.findall(r"__u32\s+(\w+);", body[1])
        assert [f[0] for f in pyclass._fields_] == fields
        assert ctypes.sizeof(pyclass) == 4 * len(fields)


def test_map_names_are_those_in_the_program() -> None:
    source = abi.PROGRAM_SOURCE.read_text()
    for name in abi.ALL_MAPS:
        assert re.search(rf"\b{name}\b", source), name
    assert f"int {abi.PROG_NAME}(" in source
    assert abi.MAP_LAYOUT[abi.MAP_LISTENERS][3] == abi.SLOT_COUNT
    assert set(abi.SLOT_NAMES) == set(range(abi.SLOT_COUNT))
    assert max(abi.COUNTER_NAMES) < abi.CNT_COUNT
