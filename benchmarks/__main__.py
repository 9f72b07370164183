"""``python -m benchmarks run [--quick]`` (see benchmarks/README.md)."""

import sys

from .run import main

if __name__ == "__main__":
    if sys.argv[1:2] != ["run"]:
        sys.exit(
            "usage: python -m benchmarks run [--quick] [--repeats N] [--only NAMES] "
            "[--platform wine|linux] [--modes echo,churn,idle,calls,streams,protocol,client,"
            "workers,balanced,proxy-churn] "
            "[--out DIR]"
        )
    sys.exit(main(sys.argv[2:]))
