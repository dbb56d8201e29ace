"""Prints one short table from the JSON lines the benchmarks left in a folder (used by gpu_check.sh).

    python -m benchmarks.summarize OUT_DIR
"""
import json
import sys
from pathlib import Path

from benchmarks.timer import print_table


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            rows.append({"benchmark": path.stem, "case": "no JSON result", "value": ""})
            continue
        for row in record.get("rows", []):
            case = " ".join(str(row[k]) for k in ("shape", "dtype", "mode") if k in row)
            value = ", ".join(f"{k}={row[k]:.3g}" for k in ("ours_ms", "speedup", "frac_peak_bw", "frac_peak_flops")
                              if isinstance(row.get(k), float))
            rows.append({"benchmark": record.get("benchmark", path.stem), "device": record.get("device", ""),
                         "case": case, "value": value})
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
