"""``python -m iocp_echo``: run the echo server (see ``--help``)."""

import sys

from .cli import main

sys.exit(main())
