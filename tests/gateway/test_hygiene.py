"""LICENSE, SECURITY.md and CHANGELOG.md say what pyproject.toml and the docs promise."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_license_is_the_full_apache_2_text_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for section in (
        "1. Definitions.",
        "4. Redistribution.",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
        "APPENDIX: How to apply the Apache License to your work.",
    ):
        assert section in text, section
    assert len(text) > 10000


def test_security_policy_and_changelog_cover_reporting_scope_and_compatibility():
    sec = (ROOT / "SECURITY.md").read_text()
    assert "## Reporting" in sec and "## In scope" in sec and "## Out of scope" in sec
    log = (ROOT / "CHANGELOG.md").read_text()
    assert "## Compatibility promise" in log and "### Upgrade notes" in log
    for promised in ("docs/config-reference.md", "docs/reasons.md", "Metric names", "exit codes"):
        assert promised in log, promised
    for doc in ("docs/config-reference.md", "docs/reasons.md", "docs/logging.md", "deploy/README.md"):
        assert (ROOT / doc).exists(), doc
