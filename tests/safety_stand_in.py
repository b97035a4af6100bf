"""A stand-in NSFW checker for the mode tests: it flags every image while the file named by
RYLA_TEST_FLAG_FILE says "flag", and counts its calls in that file's ".calls" sibling."""

from __future__ import annotations

import os
from pathlib import Path


class FlagOnDemand:
    name = "stand-in"

    def __init__(self):
        self.switch = Path(os.environ["RYLA_TEST_FLAG_FILE"])

    def check(self, images):
        calls = self.switch.with_suffix(".calls")
        calls.write_text(str(int(calls.read_text() or 0) + 1) if calls.exists() else "1")
        flag = self.switch.exists() and self.switch.read_text().strip() == "flag"
        return [flag for _ in images]
