"""Prints one short table from the JSON lines the benchmarks left in a folder (used by gpu_check.sh).

    python -m benchmarks.summarize OUT_DIR

A row (from every list of rows a record holds: "rows", "decode_rows", ...) has a case made of its text and
integer fields, and a value made of the timing, rate, fraction-of-peak and speedup fields it has (each
benchmark names them a little differently).
"""
import json
import sys
from pathlib import Path

from benchmarks.timer import print_table

VALUE_HINTS = ("ms", "speedup", "frac", "peak", "tflops", "GB/s", "gbps", "of_bw", "tok_s", "TPF")


def _case(row: dict) -> str:
    return " ".join(f"{v}" if isinstance(v, str) else f"{k}={v}" for k, v in row.items()
                    if isinstance(v, (str, int)) and not isinstance(v, bool))


def _value(row: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in row.items()
                     if isinstance(v, float) and any(h.lower() in k.lower() for h in VALUE_HINTS))


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            rows.append({"benchmark": path.stem, "device": "", "case": "no JSON result", "value": ""})
            continue
        table_rows = [row for key, value in record.items() if key.endswith("rows") and isinstance(value, list)
                      for row in value]
        for row in table_rows:
            rows.append({"benchmark": record.get("benchmark", path.stem), "device": record.get("device", ""),
                         "case": _case(row), "value": _value(row)})
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
