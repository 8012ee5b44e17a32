"""Run every paper table's embedded twin and aggregate each into a table (the README's
"Paper tables on the embedded model" section is this script's output, pasted).

    python experiments/embedded_twins.py                 # run (resumes) + aggregate all six
    python experiments/embedded_twins.py --only admm_nm  # one table
    python experiments/embedded_twins.py --no-run        # aggregate what is there
    python experiments/embedded_twins.py --twin smollm2   # the real-model twins (SmolLM2-135M)

Each twin is `prunelab -m experiment=<table>_embedded` (W&B offline unless configured);
each table is `prunelab-aggregate 'outputs/runs/experiment=<table>_embedded*'` (markdown,
LaTeX, JSON and plots in outputs/tables/<table>_embedded/). The combined markdown goes to
outputs/tables/embedded_twins.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from prunelab.aggregate import aggregate

TABLES = ("llm_pruner_table1", "loraprune_table", "lorashear_table1", "admm_table", "admm_nm", "atp_table")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=TABLES, default=list(TABLES))
    p.add_argument("--output-root", default="outputs")
    p.add_argument("--no-run", action="store_true", help="only aggregate existing runs")
    p.add_argument("--twin", choices=("embedded", "smollm2"), default="embedded", help="which model's twins")
    args = p.parse_args()
    root = Path(args.output_root)
    sections = []
    for table in args.only:
        twin = f"{table}_{args.twin}"
        if not args.no_run:
            cmd = [sys.executable, "-m", "prunelab.cli", "-m", f"experiment={twin}", f"output_root={root}"]
            subprocess.run(cmd, check=False)  # a failed job is recorded and shown by the aggregate
        res = aggregate([str(root / "runs" / f"experiment={twin}*")], root / "tables" / twin)
        sections.append(f"#### `{twin}` (`prunelab -m experiment={twin}`)\n\n{res['markdown']}")
    out = root / "tables" / f"{args.twin}_twins.md"
    out.write_text("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
