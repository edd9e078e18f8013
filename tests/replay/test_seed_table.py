"""The seed-table script end to end with tiny parameters: files written, both policies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from scripts import seed_table


def test_seed_table_writes_both_policies(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "results"
    rc = seed_table.main([
        "--guests", "2", "--rate", "40", "--duration", "0.5", "--rounds", "1",
        "--out", str(out),
    ])
    assert rc == 0
    text = (out / "seed-table.md").read_text()
    # Both guest-kernel patterns, the seed's era first, each with its goals.
    assert text.index("guest kernel `linux-2.6`") < text.index("guest kernel `linux-6`")
    assert text.count("### Goals") == 2
    assert "| 1 | floor |" in text
    assert "| 1 | legacy |" in text
    assert "| 1 | shadow |" in text
    assert "Forwarded table reads /s" in text and "Slow-path CPU" in text
    assert "140%" in text and "-57%" in text  # the seed's own figures beside ours
    assert "shadow forwards no table reads: **met**" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "seed-table.png").stat().st_size > 0
