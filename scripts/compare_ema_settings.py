"""Compare EMA settings on one training run: several averages of G updated side by side.

    python scripts/compare_ema_settings.py --out ema_settings.json [key=value ...]

Trains the demo (or the run the overrides describe) once, keeps one EMA per setting besides
the run's own, and at every evaluation (`eval.every`, default here 200) measures the training
weights and each average with the same latents. One process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETTINGS = {"half-life 10 kimg, ramp-up 0.05 (default)": (10.0, 0.05), "10 kimg, ramp-up 0.02": (10.0, 0.02),
            "10 kimg, ramp-up 0.1": (10.0, 0.1), "1 kimg, ramp-up 0.05": (1.0, 0.05),
            "2 kimg, no ramp-up": (2.0, None), "0.5 kimg, no ramp-up": (0.5, None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gan_dist import distributed as gdist
    from gan_dist.config import load_config
    from gan_dist.ema import EMA
    from gan_dist.launcher import configure_threads
    from gan_dist.trainer import Trainer

    cfg = load_config(None, ["eval.every=200", "train.ckpt_every=100000", *args.overrides])
    info = gdist.init_distributed()
    configure_threads(cfg, 1, info.launcher)
    trainer = Trainer(cfg, info)
    if trainer.ema is None or trainer.evaluator is None:
        raise SystemExit("needs ema.enabled=true and an evaluator (eval.enabled=true)")
    extras = {name: EMA(trainer.strategy, hl, r) for name, (hl, r) in SETTINGS.items()}
    own_update = trainer.ema.update

    def update(cur_nimg: int, batch_nimg: int) -> float:
        for e in extras.values():
            e.update(cur_nimg, batch_nimg)
        return own_update(cur_nimg, batch_nimg)

    rows = []

    def evaluate() -> None:
        key = trainer.evaluator.fd_key
        row = {"step": trainer.step, "training weights": trainer.evaluator.run(trainer.samples, trainer.device)[key]}
        for name, e in extras.items():
            with e.swapped():
                row[name] = trainer.evaluator.run(trainer.samples, trainer.device)[key]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    trainer.ema.update = update
    trainer.evaluate = evaluate
    try:
        trainer.fit()
    finally:
        trainer.close()
        gdist.teardown()
    args.out.write_text(json.dumps({"overrides": args.overrides, "evaluations": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
