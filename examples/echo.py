"""Run the iocp_echo server as a program: ``python examples/echo.py --port 9000``.

Works from a fresh checkout without installing (the checkout's ``iocp_echo`` is used), and
with the package installed.  ``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iocp_echo.cli import main

if __name__ == "__main__":
    sys.exit(main())
