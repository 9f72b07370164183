"""PNG charts of a results folder (needs matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(folder: Path) -> None:
    records = json.loads((folder / "latest.json").read_text())
    for platform_name, title in (
        ("wine", "under Wine (Windows CPython 3.13)"),
        ("linux", "native Linux"),
    ):
        echo = [r for r in records if r["platform"] == platform_name and r["mode"] == "echo"]
        if not echo:
            continue
        points = sorted({(r["msg_size"], r["concurrency"]) for r in echo})
        names = sorted({(r["server"], r["runtime"]) for r in echo})
        sticks = {r["server"] for r in echo if r.get("role") == "stick"}
        figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(points)), 4.5))
        width = 0.8 / len(names)
        for index, (server, runtime) in enumerate(names):
            values = []
            for point in points:
                match = [
                    r
                    for r in echo
                    if (r["server"], r["runtime"]) == (server, runtime)
                    and (r["msg_size"], r["concurrency"]) == point
                ]
                values.append(match[0]["rps"] if match else 0)
            axes.bar(
                [i + index * width for i in range(len(points))],
                values,
                width,
                label=f"{server} ({runtime}{', measuring stick' if server in sticks else ''})",
                hatch="//" if server in sticks else None,
            )
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(points))])
        axes.set_xticklabels([f"{s} B\n×{c}" for s, c in points])
        axes.set_ylabel("requests/s (median)")
        axes.set_title(f"Echo throughput {title}")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / f"echo-{platform_name}.png", dpi=110)
        plt.close(figure)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
