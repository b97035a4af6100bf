"""`ryla-client`: talk to a running ryla server (filled in by the API issue)."""

import sys


def main(argv=None) -> int:
    print("ryla-client: not available in this build", file=sys.stderr)
    return 2
