"""The scripts' command line: one line and exit 2 on a missing argument, a bad config or override, or a bad value."""

from __future__ import annotations

import sys
from pathlib import Path

from fastgrpo.errors import FastGRPOError


def run(main, usage: str) -> int:
    """Run main(sys.argv[1:]); usage is printed when no argument is given."""
    argv, name = sys.argv[1:], Path(sys.argv[0]).name
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {name} {usage}", file=sys.stderr)
        return 2
    try:
        main(argv)
    except (FastGRPOError, ValueError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    return 0
