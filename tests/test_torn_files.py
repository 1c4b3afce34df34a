"""Files a runtime that died leaves empty on Google Drive: the file's name reached Google, its content
did not (the two are uploaded separately). The next runtime treats such a file as never written, so
`up` works again and writes it anew; a file with broken content is still reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from installer.connection import read_connection_file
from installer.errors import ConfigError, ConnectError
from installer.settings import SAVED_FILE, resolve


def test_empty_saved_settings_are_no_saved_settings(tmp_path: Path) -> None:
    saved = tmp_path / "state" / SAVED_FILE
    saved.parent.mkdir()
    saved.write_text("")
    settings = resolve({"root": str(tmp_path)}, environ={})
    assert settings.port == 7860  # the default: nothing was saved
    saved.write_text("{not json")
    with pytest.raises(ConfigError, match="delete that file"):
        resolve({"root": str(tmp_path)}, environ={})


def test_an_empty_connection_file_is_no_connection_file(tmp_path: Path) -> None:
    (tmp_path / "connection.json").write_text("")
    assert read_connection_file(tmp_path) is None
    (tmp_path / "connection.json").write_text("{broken")
    with pytest.raises(ConnectError, match="not valid JSON"):
        read_connection_file(tmp_path)
