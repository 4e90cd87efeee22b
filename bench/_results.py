"""Figures written to a benchmark's --json file as they come: the file is rewritten (atomically) after
every update, so a run stopped at its time budget still leaves everything it had measured."""

from __future__ import annotations

import json
import os


class Results:
    def __init__(self, path: str | None, **fields):
        self.path, self.data = path, dict(fields)
        self.write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def add(self, section: str, key: str, value) -> None:
        """data[section][key] = value."""
        self.data.setdefault(section, {})[key] = value
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)
