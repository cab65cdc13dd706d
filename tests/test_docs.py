"""The docs cannot rot: every file that docs/writing-a-strategy.md includes is shown verbatim.

A block is announced by ``<!-- file: PATH -->`` and must equal that file; the files themselves are
installed and run by tests/test_plugin.py."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "writing-a-strategy.md"
BLOCK = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)\n```", re.S)


def test_every_included_file_is_shown_verbatim():
    found = {m["path"]: m["body"] for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))}
    assert set(found) == {
        "tests/plugin_pkg/fedkd_example_plugin/__init__.py",
        "tests/plugin_pkg/pyproject.toml",
        "tests/plugin_pkg/fedkd_example_plugin/feddf_dafl.py",
        "tests/plugin_pkg/fedkd_example_plugin/ensemble_kd.py",
        "tests/plugin_pkg/fedkd_example_plugin/stateful.py",
    }
    for path, body in found.items():
        assert body == (REPO / path).read_text(encoding="utf-8").rstrip(), f"{path} changed; update the docs"


def test_the_public_api_is_documented():
    import fedkd.api as api

    doc = api.__doc__ or ""
    for name in api.__all__:
        assert (getattr(api, name).__doc__ or "").strip(), f"{name} has no docstring"
        assert name in doc or name in DOC.read_text(encoding="utf-8"), f"{name} is not described"
