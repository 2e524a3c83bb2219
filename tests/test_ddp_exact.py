"""Exact gradient syncing under DDP, with real gloo processes."""
from __future__ import annotations

import pytest
import torch

from tests._mp import PYTHON, REPO, run, run_ranks

WORKER = str(REPO / "tests" / "workers" / "ddp_worker.py")
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]


def job(tmp_path, world_size: int, name: str, *args: str) -> list[dict]:
    outs = [tmp_path / f"{name}-{r}.pt" for r in range(world_size)]
    if world_size == 1:
        run([PYTHON, WORKER, "--out", str(outs[0]), *args], timeout=240)
    else:
        # every rank writes its own file: --out is suffixed by rank inside the worker's argv
        run_ranks([str(REPO / "tests" / "workers" / "per_rank.py"), WORKER, "--out", str(tmp_path / f"{name}-{{rank}}.pt"), *args],
                  world_size, timeout=240)
    return [torch.load(o, weights_only=True) for o in outs]


def assert_same_weights(a: dict, b: dict, exact: bool = False) -> None:
    for model in ("G", "D"):
        for key in a[model]:
            if exact:
                assert torch.equal(a[model][key], b[model][key]), f"{model}.{key} differs"
            else:
                torch.testing.assert_close(a[model][key], b[model][key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{model}.{key}: {m}")


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    two = job(tmp_path, 2, "two", "--global-batch", "16", "--iters", "3")
    one = job(tmp_path, 1, "one", "--global-batch", "16", "--iters", "3")
    assert two[0]["strategy"] == "ddp" and one[0]["strategy"] == "none"
    assert_same_weights(two[0], one[0])
    # all ranks hold identical weights
    assert_same_weights(two[0], two[1], exact=True)
    # the G phase computes no gradients for D
    assert not any(two[0]["d_grads_in_g_phase"]) and not any(one[0]["d_grads_in_g_phase"])


def test_bytes_reduced_per_iteration_is_the_minimum_and_seed_loop_is_not(tmp_path):
    iters = 3
    ours = job(tmp_path, 2, "ours", "--global-batch", "8", "--iters", str(iters))[0]
    seed = job(tmp_path, 2, "seed", "--global-batch", "8", "--iters", str(iters), "--mode", "seed")[0]
    nG, nD = ours["numel"]["G"], ours["numel"]["D"]
    minimum = 4 * (nG + nD)  # fp32: one reduction of each model's gradients per update
    assert ours["bytes"]["G"] == iters * 4 * nG
    assert ours["bytes"]["D"] == iters * 4 * nD
    assert (ours["bytes"]["G"] + ours["bytes"]["D"]) / iters == minimum
    # the DCGAN example's loop wrapped in DDP reduces D three times per iteration
    seed_per_iter = (seed["bytes"]["G"] + seed["bytes"]["D"]) / iters
    assert seed_per_iter == 4 * (nG + 3 * nD)
    assert seed_per_iter / minimum > 1.3


@pytest.mark.parametrize("d_steps", [1, 2])
def test_gradient_accumulation_equals_larger_batch_with_one_reduction(tmp_path, d_steps):
    iters = 2
    accum = job(tmp_path, 2, "acc", "--global-batch", "16", "--accum", "2", "--iters", str(iters),
                "--d-steps", str(d_steps))
    big = job(tmp_path, 1, "big", "--global-batch", "16", "--accum", "1", "--iters", str(iters),
              "--d-steps", str(d_steps))
    assert_same_weights(accum[0], big[0])
    assert_same_weights(accum[0], accum[1], exact=True)
    r0 = accum[0]
    # one reduction per update: bytes of one full gradient per G update and per D update
    assert r0["bytes"]["G"] == iters * 4 * r0["numel"]["G"]
    assert r0["bytes"]["D"] == iters * d_steps * 4 * r0["numel"]["D"]


def test_single_process_accumulation_equals_larger_batch(tmp_path):
    acc = job(tmp_path, 1, "acc1", "--global-batch", "16", "--accum", "4", "--iters", "2")
    big = job(tmp_path, 1, "big1", "--global-batch", "16", "--accum", "1", "--iters", "2")
    assert_same_weights(acc[0], big[0])
