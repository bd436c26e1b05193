"""The README's markdown table of one setting, from the sweep's report (summary.json's plain-text table).

    python benchmarks/seed001/readme_table.py full     # or k100, k1000

Cells read "mean ± std" over three seeds, "mean ± std (n)" over fewer, "mean (1)" for one seed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks/results/seed001"
HEADERS = {"citation_intent": "acl-arc"}


def markdown(setting: str) -> str:
    table = json.loads((RESULTS / "summary.json").read_text())["table"]
    block = table.split(f"setting {setting} (", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    header = re.split(r"\s{2,}", block[0].strip())
    header = [HEADERS.get(h, h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in block[1:]:
        cells = re.split(r"\s{2,}", row.strip())
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    match = re.fullmatch(r"(-?[\d.]+)±([\d.]+) \((\d)\)", text)
    if match:
        mean, std, n = match.groups()
        return f"{mean} ({n})" if n == "1" else f"{mean} ± {std} ({n})"
    match = re.fullmatch(r"(-?[\d.]+)±([\d.]+)", text)
    return f"{match[1]} ± {match[2]}" if match else text


if __name__ == "__main__":
    print(markdown(sys.argv[1] if len(sys.argv) > 1 else "full"))
