"""bpf.fake.FakeCapture keeps the real Capture's interface and refusals (no kernel needed)."""

from __future__ import annotations

import socket

import pytest

from bpf.capture import Capture, CaptureBackend, CaptureError, EnrolledPod
from bpf.fake import FakeCapture


def test_both_implement_the_protocol() -> None:
    assert isinstance(FakeCapture(), CaptureBackend)
    assert isinstance(Capture("/sys/fs/bpf/never-installed"), CaptureBackend)


def test_fake_refuses_what_the_real_one_refuses() -> None:
    fake = FakeCapture(interfaces={"veth1", "veth2"})
    with pytest.raises(CaptureError, match="install"):
        fake.enroll(EnrolledPod("a/b", "veth1", ("10.0.0.1",)))
    fake.install()
    with pytest.raises(CaptureError, match="not an IPv4 address"):
        fake.enroll(EnrolledPod("a/b", "veth1", ("fd00::1",)))
    with pytest.raises(CaptureError, match="no interface"):
        fake.enroll(EnrolledPod("a/b", "veth9", ("10.0.0.1",)))
    fake.enroll(EnrolledPod("a/b", "veth1", ("10.0.0.1",)))
    with pytest.raises(CaptureError, match="already enrolled"):
        fake.enroll(EnrolledPod("a/c", "veth2", ("10.0.0.1",)))
    s = socket.socket()
    with s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(CaptureError, match="lacks IP_TRANSPARENT"):
            fake.set_listeners(s.fileno(), None, None)
    st = fake.status()
    assert st.pod_ips == {"10.0.0.1": "veth1"} and len(st.rules) == 3
    fake.detach()
    assert fake.rules_kept  # clean stop keeps the pods' rules: fail closed
    fake.uninstall()
    assert fake.status().rules == []
