"""Every product module imports on its own: an import cycle, or a module that only works when
something else was imported first, is a defect (DESIGN §2). Each import runs in a fresh
interpreter, because inside one process the first test's imports would hide the next one's
cycle."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = (
    "agent", "bpf", "caserver", "cli", "cni", "credentials", "identity", "kube", "lab", "mesh", "policy",
    "serving", "sources", "tunnel", "waypoint",
)  # fmt: skip


def _product_modules() -> list[str]:
    mods = []
    for pkg in PRODUCT_PACKAGES:
        base = ROOT / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "_pb2" in path.name:
                continue  # generated protobuf code: imported through its package
            parts = path.relative_to(ROOT).with_suffix("").parts
            mod = ".".join(parts)
            mods.append(mod.removesuffix(".__init__"))
    return mods


MODULES = _product_modules()


def test_the_module_list_is_not_empty() -> None:
    assert len(MODULES) > 40, MODULES


def test_every_product_module_imports_on_its_own() -> None:
    # One interpreter per module; a few in parallel to keep the suite quick.
    failures: dict[str, str] = {}
    procs = []
    for mod in MODULES:
        p = subprocess.Popen(
            [sys.executable, "-c", f"import {mod}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((mod, p))
        if len(procs) >= 8:
            mod0, p0 = procs.pop(0)
            _, err = p0.communicate(timeout=60)
            if p0.returncode:
                failures[mod0] = err.strip().splitlines()[-1] if err.strip() else f"exit {p0.returncode}"
    for mod, p in procs:
        _, err = p.communicate(timeout=60)
        if p.returncode:
            failures[mod] = err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"
    assert not failures, "modules that fail to import on their own:\n" + "\n".join(
        f"  {m}: {e}" for m, e in sorted(failures.items())
    )


@pytest.mark.parametrize("contract_tool", [ROOT / ".venv" / "bin" / "lint-imports"])
def test_import_contracts_hold(contract_tool: pathlib.Path) -> None:
    if not contract_tool.exists():
        pytest.fail(f"{contract_tool} is missing: run scripts/setup.sh")
    r = subprocess.run([str(contract_tool)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
