"""The range test's suggested learning rate against a small grid of rates, in real runs.

    .venv/bin/python benchmarks/lr_find_compare.py [--json out.json]

For each dataset (dtrain's generated data, and scikit-learn's digits written as Parquet), runs
``python -m dtrain.lr_find``, then a full run at its suggestion and at each rate of a grid (the same
flags otherwise), and prints a table of the held-out accuracy of each. One process each (no
horovodrun): the suggestion does not depend on the world size beyond the data order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GRID = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
COMMON = ["--optimizer", "sgd", "--momentum", "0.9", "--global-batch-size", "64", "--hidden", "64"]


def digits(root: Path) -> list[str]:
    import pandas as pd
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    df = pd.DataFrame(x / 16.0, columns=[f"p{i:02d}" for i in range(x.shape[1])])
    df["label"] = y
    path = root / "digits"
    path.mkdir()
    df.to_parquet(path / "part-0.parquet")
    return ["--data", str(path), "--epochs", "10"]


def run(module: str, args: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", module, *args, "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    name = "lr_find.json" if module == "dtrain.lr_find" else "summary.json"
    return json.loads((run_dir / name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    opts = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datasets = {"generated (20k rows)": ["--gen-rows", "20000", "--epochs", "3"], "digits": digits(root)}
        for name, data in datasets.items():
            found = run("dtrain.lr_find", [*COMMON, *data, "--num-steps", "100"], root / f"{len(results)}-find")
            suggested = found["suggested_lr"]
            row = {"dataset": name, "suggested_lr": suggested, "grid": {}}
            for lr in [suggested, *GRID]:
                s = run("dtrain", [*COMMON, *data, "--lr", str(lr)], root / f"{len(results)}-{lr}")
                row["grid"][lr] = s["eval_accuracy"]
            results.append(row)
    print(f"{'dataset':<22}{'suggested':>10}{'its acc':>9}  " + "".join(f"{lr:>8g}" for lr in GRID) + "   best")
    for row in results:
        accs = row["grid"]
        best = max(accs[lr] for lr in GRID)
        print(f"{row['dataset']:<22}{row['suggested_lr']:>10.3g}{accs[row['suggested_lr']]:>9.4f}  "
              + "".join(f"{accs[lr]:>8.4f}" for lr in GRID) + f"{best:>7.4f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
