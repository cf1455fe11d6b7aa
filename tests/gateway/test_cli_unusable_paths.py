"""CLI commands given an unusable path answer one line and exit 2, never a traceback."""

from __future__ import annotations

from gateway.cli import main


def test_dev_certs_into_an_unwritable_place(tmp_path, capsys):
    (tmp_path / "plainfile").write_text("x")
    assert main(["dev-certs", str(tmp_path / "plainfile" / "certs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("portvakt dev-certs: cannot write ") and "Traceback" not in err
