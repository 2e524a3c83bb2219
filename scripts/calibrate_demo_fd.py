"""Calibrate a demo's slow test: train the demo at the test's length with several seeds
and record the digits FD at initialisation and at the end, class coverage and the time taken.

    python scripts/calibrate_demo_fd.py --seeds 0 1 2 3 4 --parallel 2      # the DCGAN demo
    python scripts/calibrate_demo_fd.py --config configs/stylegan2_digits.yaml \
        --test tests/test_stylegan2_demo.py --seeds 0 1 2

--test names the test module whose OVERRIDES, MARGIN and CALIBRATION (the json it reads) are
used (default tests/test_demo_learns.py); --config is the config file the runs train from
(default: the test module's CONFIG if it has one, else the built-in demo), recorded in the json
so that the test can check it was calibrated for its own config. The test's FD threshold is the
worst seed's final FD times MARGIN. Rerun it whenever the demo model, the data or the metric changes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))



def load_test(path: Path) -> ModuleType:
    """The test module that says the demo's length (OVERRIDES), MARGIN and CALIBRATION."""
    spec = importlib.util.spec_from_file_location(f"tests.{path.stem}", path)
    if spec is None or not path.is_file():
        raise SystemExit(f"--test {path}: no such test module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [k for k in ("OVERRIDES", "MARGIN", "CALIBRATION") if not hasattr(module, k)]
    if missing:
        raise SystemExit(f"--test {path}: it does not define {', '.join(missing)}")
    return module


def train(seed: int, root: Path, threads: int, overrides: list[str], config: Optional[str]) -> dict:
    run_dir = root / f"seed{seed}"
    cmd = [sys.executable, "-m", "gan_dist.train", *(["--config", config] if config else []), *overrides,
           f"run.seed={seed}", f"run.dir={run_dir}", f"run.threads={threads}"]
    started = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - started
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    out = {"seed": seed, "fd_init": round(first["digits_fd"], 3), "fd_final": round(last["digits_fd"], 3),
           "kid_final": round(last["kid"], 4), "class_coverage": last["class_coverage"],
           "confident_fraction": round(last["confident_fraction"], 4), "steps": last["step"],
           "wall_s": round(wall, 1)}
    if len(rows) > 2:
        out["curve"] = {r["step"]: round(r["digits_fd"], 2) for r in rows}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test", type=Path, default=REPO / "tests" / "test_demo_learns.py",
                   help="the test module to calibrate (its OVERRIDES, MARGIN, CALIBRATION)")
    p.add_argument("--config", help="config file of the runs (default: the test module's CONFIG, if any)")
    p.add_argument("--out", type=Path, help="where to write (default: the test module's CALIBRATION)")
    args = p.parse_args()
    test = load_test(args.test)
    overrides, margin = list(test.OVERRIDES), test.MARGIN
    config = args.config or getattr(test, "CONFIG", None)
    out_path = args.out or test.CALIBRATION
    os.environ.setdefault("GAN_DIST_CACHE", str(Path(tempfile.gettempdir()) / "gan_dist_calibration_cache"))
    root = Path(tempfile.mkdtemp(prefix="demo-calib-"))
    started = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda s: train(s, root, args.threads, overrides, config), args.seeds))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    worst = max(r["fd_final"] for r in results)
    record = {
        "command": "python scripts/calibrate_demo_fd.py " + " ".join(sys.argv[1:]),
        **({"config": config} if config else {}), "overrides": overrides, "margin": margin,
        "threshold": round(worst * margin, 2),
        "worst_fd_final": worst, "min_fd_init": min(r["fd_init"] for r in results),
        "min_class_coverage": min(r["class_coverage"] for r in results),
        "machine": f"{os.cpu_count()} CPU cores, shared; {args.parallel} run(s) at once, {args.threads} thread(s) each",
        "total_wall_s": round(time.time() - started, 1),
        "total_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "runs": results,
    }
    Path(out_path).write_text(json.dumps(record, indent=1) + "\n")
    print(f"threshold {record['threshold']} (worst final FD {worst} x {margin}); wrote {out_path}")


if __name__ == "__main__":
    main()
