"""What an evaluation costs: seconds per 10k images for generating + embedding, per network, at
1 and more processes on this machine (each process its share of the images and of the cores).

    python benchmarks/eval_cost.py                          # DCGAN-64 G (digits: the demo's); 1 and 2 processes
    python benchmarks/eval_cost.py --n 64 --nprocs 1 2 4 --networks inception

The networks carry random weights in the published layouts (the speed does not depend on the
values, and nothing is downloaded). A few batches are timed after one warm-up batch and the
time is extrapolated to 10k images: generating and embedding scale linearly in the number of
images. Writes benchmarks/results/eval_cost_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODELS = {"dcgan-32": ["model.resolution=32", "model.channels=1"],
          "dcgan-64": ["model.resolution=64", "model.channels=3", "model.dcgan.ngf=64", "model.dcgan.ndf=64"]}


def write_weights(folder: Path) -> dict[str, str]:
    """Random weight files in the published layouts (what eval.*_weights would name)."""
    import torchvision

    from gan_dist.metrics.extractors import INCEPTION, VGG16, build_fidelity_inception

    paths = {"inception": folder / INCEPTION.files[0], "vgg16": folder / VGG16.files[0]}
    torch.save(build_fidelity_inception(None).state_dict(), paths["inception"])
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), paths["vgg16"])
    return {k: str(v) for k, v in paths.items()}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, weights: dict, queue: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from gan_dist import distributed as gdist
    from gan_dist.config import load_config
    from gan_dist.metrics.evaluation import generated_outputs
    from gan_dist.metrics.extractors import build_extractor
    from gan_dist.models import build_models

    info = gdist.init_distributed(timeout_s=600)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rows = []
    for name in args.networks:
        model = "dcgan-32" if name == "digits" else args.model  # the digits classifier measures the demo's G
        cfg = load_config(None, MODELS[model] + [f"eval.inception_weights={weights['inception']}",
                                                 f"eval.vgg16_weights={weights['vgg16']}"])
        G, _ = build_models(cfg.model, seed=0)
        G = G.to(info.device).eval()
        ex = build_extractor(name, info.device, cfg.eval)
        n = args.n_digits if name == "digits" else args.n
        batch = max(1, min(args.digits_batch_size if name == "digits" else args.batch_size, n // world))

        @torch.no_grad()
        def generate(z: torch.Tensor) -> torch.Tensor:
            return G(z).float()

        generated_outputs(generate, {"main": ex}, batch * world, G.z_dim, batch, device=info.device)  # warm-up
        gdist.barrier()
        started = time.perf_counter()
        generated_outputs(generate, {"main": ex}, n, G.z_dim, batch, device=info.device)
        gdist.barrier()
        seconds = time.perf_counter() - started
        rows.append({"network": name, "model": model, "world_size": world, "threads_per_process":
                     torch.get_num_threads(), "images": n, "batch_size": batch, "seconds": round(seconds, 3),
                     "img_per_sec": round(n / seconds, 3), "seconds_per_10k": round(seconds / n * 10_000, 1)})
    if info.is_main:
        queue.put(rows)
    gdist.teardown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="dcgan-64")
    p.add_argument("--networks", nargs="+", default=["inception", "vgg16", "digits"],
                   choices=["inception", "vgg16", "digits"])
    p.add_argument("--n", type=int, default=24, help="images timed per standard network")
    p.add_argument("--n-digits", type=int, default=2000, help="images timed for the digits classifier")
    p.add_argument("--batch-size", type=int, default=8, help="per process, for the standard networks")
    p.add_argument("--digits-batch-size", type=int, default=250, help="per process (eval.batch_size's default)")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    from tests._mp import free_port  # a free TCP port of our own for each process group

    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_weights(Path(tmp))
        ctx = mp.get_context("spawn")
        for world in args.nprocs:
            queue = ctx.Queue()
            port = free_port()
            procs = [ctx.Process(target=worker, args=(r, world, port, args, weights, queue)) for r in range(world)]
            for proc in procs:
                proc.start()
            got = None
            while got is None:
                try:
                    got = queue.get(timeout=5)
                except Exception:  # queue.Empty: check that the workers are alive
                    failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
                    if failed:
                        for proc in procs:
                            proc.kill()
                        raise SystemExit(f"a benchmark process failed (exit codes {failed}); see its traceback above")
            for proc in procs:
                proc.join(timeout=120)
            rows += got
            for row in got:
                print(json.dumps(row), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
            "cores": os.cpu_count(), "torch": torch.__version__, "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_cost_{device}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Evaluation cost ({meta['device']}, {meta['cores']} cores, torch {meta['torch']})", "",
             f"`{meta['command']}`; load average before {meta['load_average_before']}, after "
             f"{meta['load_average_after']} (a shared machine: other jobs ran at the same time).", "",
             "| network | G | processes | threads/process | images timed | s per 10k images (generate + embed) | img/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['model']} | {r['world_size']} | {r['threads_per_process']} | {r['images']} "
                     f"| {r['seconds_per_10k']:.0f} | {r['img_per_sec']:.2f} |")
    (out / f"eval_cost_{device}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
