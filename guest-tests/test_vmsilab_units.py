"""Unit tests of vmsilab helpers that need neither root nor QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmsilab.config import CHROOT_LAB, HostOS, LabConfig, LabPaths, detect_mirror
from vmsilab.initramfs import newc_archive
from vmsilab.iperf import iperf_json, marker_rc, summarize


def test_mirror_from_deb822_skips_security(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMSI_DEBIAN_MIRROR", raising=False)
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\nComponents: main\n"
    )
    (d / "other.sources.disabled").write_text("Types: deb\nURIs: http://x/debian\nSuites: a\n")
    assert detect_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_one_line_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMSI_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    assert detect_mirror(tmp_path) == "http://m.example/debian"
    monkeypatch.setenv("VMSI_DEBIAN_MIRROR", "http://override.example/debian/")
    assert detect_mirror(tmp_path) == "http://override.example/debian"


def test_inner_path(tmp_path: Path) -> None:
    bookworm = LabConfig(LabPaths(tmp_path), HostOS("debian", "12", "bookworm"))
    trixie = LabConfig(LabPaths(tmp_path), HostOS("debian", "13", "trixie"))
    sock = tmp_path / "runs" / "x" / "vf0.sock"
    assert bookworm.inner_path(sock) == CHROOT_LAB / "runs" / "x" / "vf0.sock"
    assert trixie.inner_path(sock) == sock
    assert bookworm.env_prefix("ns")[:4] == ["ip", "netns", "exec", "ns"]
    assert trixie.env_prefix(None) == []


def test_newc_archive_layout() -> None:
    data = newc_archive({"lab-run.sh": (0o755, b"echo hi\n")})
    assert len(data) % 512 == 0
    assert data.startswith(b"070701")
    # mode field (2nd) and file size (7th) of the first header
    fields = [int(data[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == 0o100755 and fields[6] == 8
    assert b"lab-run.sh\0" in data and b"echo hi\n" in data and b"TRAILER!!!\0" in data


def test_iperf_output_parsing() -> None:
    out = (
        "PING_RC=0\nIPERF_RC=0\nIPERF_JSON_BEGIN\n"
        '{"end": {"sum_sent": {"bits_per_second": 2e8, "seconds": 3, "retransmits": 1},'
        ' "sum_received": {"bits_per_second": 1.9e8, "seconds": 3}}}\n'
        "\nIPERF_JSON_END\n"
    )
    assert marker_rc(out, "PING_RC") == 0 and marker_rc(out, "MISSING") is None
    s = summarize(iperf_json(out))
    assert s.received_bps == 1.9e8 and s.retransmits == 1
