"""The benchmark scripts at tiny sizes: well-formed JSON with every field, reports that say what
was run, and the communication of DDP with 2 real processes equal to the analytic minimum.

No timing is asserted: only that the numbers are there and consistent with each other.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.common import PARTS, ROW_FIELDS
from gan_dist.config import TrainConfig, load_config
from gan_dist.models import build_models
from tests._mp import PYTHON, REPO, base_env, run

pytestmark = [pytest.mark.timeout(600)]

THROUGHPUT = str(REPO / "benchmarks" / "throughput.py")
SEED_LOOP = str(REPO / "benchmarks" / "seed_loop.py")
TINY_MODEL = ["model.dcgan.ngf=4", "model.dcgan.ndf=4", "model.dcgan.nz=8"]
TINY = ["--model", "dcgan-32", "--batch-size", "4", *[a for kv in TINY_MODEL for a in ("--set", kv)],
        "--warmup", "1", "--repeats", "2", "--iters", "2", "--peak-size", "256"]


def check_result(res: dict, repeats: int = 2) -> None:
    """Every row has every field, and the numbers agree with each other."""
    env = res["env"]
    for key in ("device", "device_name", "world_size", "threads_per_process", "versions", "loadavg_start",
                "loadavg_end", "other_processes_cpu_cores", "date", "argv"):
        assert key in env, key
    assert env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert res["peak_flops_per_sec"]
    assert all(v > 0 for v in res["peak_flops_per_sec"].values())
    assert res["rows"]
    for r in res["rows"]:
        missing = [f for f in ROW_FIELDS if f not in r]
        assert not missing, f"{r.get('label')}: missing {missing}"
        assert r["ms_per_iter"] > 0 and len(r["ms_per_iter_repeats"]) == repeats
        assert r["ms_per_iter"] in r["ms_per_iter_repeats"] or any(
            math.isclose(r["ms_per_iter"], x, rel_tol=1e-3) for x in r["ms_per_iter_repeats"])
        parts = [r[f"ms_{p}"] for p in PARTS]
        assert all(p >= 0 for p in parts)
        assert math.isclose(sum(parts) + r["ms_other"], r["ms_per_iter"], rel_tol=1e-3, abs_tol=1e-2)
        assert r["ms_D"] > 0 and r["ms_G"] > 0 and r["ms_opt"] > 0
        assert math.isclose(r["img_per_sec"], r["global_batch_size"] / (r["ms_per_iter"] / 1e3), rel_tol=0.02)
        assert math.isclose(r["img_per_sec_per_gpu"] * r["world_size"], r["img_per_sec"], rel_tol=0.01)
        assert r["global_batch_size"] == r["batch_size"] * r["world_size"]
        assert r["flops_per_iter"] > 0 and r["peak_flops_per_sec"] > 0
        peaks = res["peak_flops_per_sec"]  # per world size (w1_fp32, ...) in a scaling run
        peak = peaks.get(r["precision"], peaks.get(f"w{r['world_size']}_{r['precision']}"))
        assert r["peak_flops_per_sec"] == round(peak)
        assert math.isclose(r["mfu"], r["achieved_flops_per_sec"] / r["peak_flops_per_sec"], rel_tol=0.02, abs_tol=1e-4)
        assert r["peak_mem_bytes"] > 0 and r["mem_kind"] in ("cpu_peak_rss", "cuda_max_memory_allocated")
        assert r["comm_min_bytes_per_iter"] == (4 * (r["params_G"] + r["params_D"]) if r["world_size"] > 1 else 0)


def tiny_params() -> tuple[int, int]:
    cfg = load_config(None, ["model.resolution=32", "model.channels=1", *TINY_MODEL])
    G, D = build_models(cfg.model, 0)
    return sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())


def d_forward_flops(batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(None, ["model.resolution=32", "model.channels=1", *TINY_MODEL])
    _, D = build_models(cfg.model, 0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        D(torch.zeros(batch, 1, 32, 32))
    return counter.get_total_flops()


def test_seed_loop_side_by_side(tmp_path):
    out, md = tmp_path / "seed.json", tmp_path / "seed.md"
    run([PYTHON, SEED_LOOP, *TINY, "--json", str(out), "--md", str(md)], timeout=400, env=base_env(threads=1))
    res = json.loads(out.read_text())
    check_result(res)
    seed, fp32, default = res["rows"]
    assert [r["impl"] for r in res["rows"]] == ["seed_loop", "gan_dist", "gan_dist"]
    assert seed["precision"] == fp32["precision"] == "fp32" and not fp32["channels_last"] and not fp32["compile"]
    d = TrainConfig()
    assert default["is_default"] and (default["precision"], default["channels_last"], default["compile"]) == (
        d.precision, d.channels_last, d.compile)
    G, D = tiny_params()
    for r in res["rows"]:
        assert (r["params_G"], r["params_D"], r["batch_size"], r["world_size"]) == (G, D, 4, 1)
        assert r["comm_bytes_per_iter"] == 0 and r["comm_ratio"] is None
    # The example also computes D's weight gradients in the G step (then throws them away):
    # exactly one more D forward's worth of FLOPs (a conv's weight gradient costs its forward).
    assert seed["flops_per_iter"] - fp32["flops_per_iter"] == d_forward_flops(4)
    assert default["flops_per_iter"] == fp32["flops_per_iter"]
    assert seed["speedup_vs_seed"] == 1.0
    assert res["ratios"]["gan_dist_fp32_vs_seed"] == fp32["speedup_vs_seed"] > 0
    assert res["ratios"]["gan_dist_defaults_vs_seed"] == default["speedup_vs_seed"] > 0
    for key, row in (("gan_dist_fp32_vs_seed", fp32), ("gan_dist_defaults_vs_seed", default)):
        by_round = res["ratios_by_round"][key]
        assert by_round == [pytest.approx(a / b, abs=2e-3) for a, b in
                            zip(seed["ms_per_iter_repeats"], row["ms_per_iter_repeats"])]
        assert len(by_round) == row["repeats"]
    text = md.read_text()
    assert "gan_dist_defaults_vs_seed, round by round: median" in text
    assert "| seed_loop fp32 (W=1, B=4)" in text and "(defaults)" in text and "Peak matmul" in text


def test_throughput_sweep_one_process(tmp_path):
    """The sweep of one process, its Markdown and chart, and a strategy whose package is missing
    reported as skipped (deepspeed made unimportable for this run only)."""
    out, md, png = tmp_path / "t.json", tmp_path / "t.md", tmp_path / "t.png"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    env = base_env(threads=1)
    env["PYTHONPATH"] = f"{shim}:{env['PYTHONPATH']}"
    run([PYTHON, THROUGHPUT, *TINY, "--precision", "fp32,bf16", "--no-compile", "--strategy", "none,deepspeed",
         "--json", str(out), "--md", str(md), "--plot", str(png)], timeout=400, env=env)
    res = json.loads(out.read_text())
    check_result(res)
    rows = res["rows"]
    assert rows[0]["impl"] == "seed_loop"
    ours = rows[1:]
    assert {(r["precision"], r["channels_last"]) for r in ours} == {
        (p, c) for p in ("fp32", "bf16") for c in (False, True)}
    assert all(r["strategy"] == "none" and r["compile"] is False and r["speedup_vs_seed"] > 0 for r in ours)
    d = TrainConfig()
    assert [r["is_default"] for r in ours] == [
        (r["precision"], r["channels_last"], r["compile"]) == (d.precision, d.channels_last, d.compile) for r in ours]
    skipped = [s for s in res["skipped"] if s["label"].startswith("gan_dist deepspeed")]
    assert len(skipped) == 4 and all("deepspeed" in s["reason"] for s in skipped)
    text = md.read_text()
    assert text.count("| gan_dist none") == 4 and "Skipped: gan_dist deepspeed" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiproc
def test_scaling_and_ddp_communication_is_the_minimum(tmp_path):
    """--scaling 1,2 starts one process, then two (torchrun); DDP's counted bytes per iteration
    are exactly one fp32 all-reduce of G's and D's gradients."""
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    run([PYTHON, THROUGHPUT, *TINY, "--precision", "fp32", "--no-channels-last", "--no-compile",
         "--strategy", "ddp,fsdp", "--no-seed-loop", "--scaling", "1,2", "--json", str(out), "--md", str(md)],
        timeout=500, env=base_env(threads=1))
    res = json.loads(out.read_text())
    check_result(res)
    G, D = tiny_params()
    minimum = 4 * (G + D)
    one = {r["strategy"]: r for r in res["rows"] if r["world_size"] == 1}
    two = {r["strategy"]: r for r in res["rows"] if r["world_size"] == 2}
    assert one["none"]["comm_bytes_per_iter"] == 0
    ddp = two["ddp"]
    assert ddp["comm_min_bytes_per_iter"] == minimum
    assert ddp["comm_bytes_per_iter"] == minimum
    assert ddp["comm_bytes_by_kind"] == {"all_reduce": minimum}
    assert ddp["comm_ratio"] == 1.0 and ddp["comm_calls_per_iter"] >= 2
    assert ddp["global_batch_size"] == 8 and ddp["scaling_efficiency"] > 0
    assert one["none"]["scaling_efficiency"] == 1.0 and ddp["scaling_baseline"] == one["none"]["label"]
    if "fsdp" in two:  # sharded: gradients reduce-scattered (padded shards), parameters all-gathered
        fsdp = two["fsdp"]
        assert fsdp["comm_bytes_by_kind"]["reduce_scatter"] >= minimum
        assert fsdp["comm_bytes_by_kind"]["all_gather"] > 0
        assert fsdp["comm_ratio"] > 1.0
    else:
        assert any(s["label"].startswith("gan_dist fsdp") for s in res["skipped"])
    text = md.read_text()
    assert "| gan_dist ddp fp32 matmul_conv | 2 |" in text and "efficiency" in text


def test_throughput_of_another_family_skips_the_dcgan_example_loop(tmp_path):
    """The example's loop is DCGAN's: for a StyleGAN2 model the default --seed-loop is reported
    as skipped with the reason, and gan_dist's own rows run."""
    from tests.workers.sharded_worker import STYLEGAN2_TINY

    out = tmp_path / "t.json"
    sets = [a for kv in STYLEGAN2_TINY for a in ("--set", kv)]
    run([PYTHON, THROUGHPUT, "--model", "stylegan2-64", "--batch-size", "4", *sets, "--precision", "fp32",
         "--no-compile", "--no-channels-last", "--warmup", "0", "--repeats", "1", "--iters", "1",
         "--peak-size", "256", "--json", str(out)], timeout=400, env=base_env(threads=1))
    res = json.loads(out.read_text())
    assert [r["impl"] for r in res["rows"]] == ["gan_dist"]
    skipped = [s for s in res["skipped"] if s["label"] == "seed_loop fp32"]
    assert len(skipped) == 1 and "stylegan2" in skipped[0]["reason"]
