"""DDP with NHWC activations: weight gradients arrive in the layout of DDP's buckets, so torch's
"Grad strides do not match bucket view strides" warning never comes, and nothing else changes:
the weights equal one process's, and the exported generator is a plain contiguous state_dict."""
from __future__ import annotations

import pytest
import torch

from tests._mp import PYTHON, REPO, run, run_ranks

WORKER = str(REPO / "tests" / "workers" / "ddp_layout_worker.py")
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]


def job(tmp_path, world_size: int, *args: str) -> tuple[dict, str]:
    out = tmp_path / f"w{world_size}-{'-'.join(args)}.pt"
    if world_size == 1:
        done = [run([PYTHON, WORKER, "--out", str(out), *args], timeout=240)]
    else:
        done = run_ranks([WORKER, "--out", str(out), *args], world_size, timeout=240)
    return torch.load(out, weights_only=True), "\n".join(d.stderr for d in done)


@pytest.mark.parametrize("channels,precision", [(1, "fp32"), (3, "bf16")])
def test_ddp_with_channels_last_warns_nothing_and_trains_like_one_process(tmp_path, channels, precision):
    two, err = job(tmp_path, 2, "--channels", str(channels), "--precision", precision)
    assert two["strategy"] == "ddp"
    assert "Grad strides do not match bucket view strides" not in err, err[-3000:]
    assert "Warning" not in err, err[-3000:]  # a DDP run prints no warning at all
    # on the CPU the convolutions run as matmuls, whose weight gradients are NHWC like the weights:
    # no gradient needed a layout copy
    assert two["mismatched"] == []
    one, _ = job(tmp_path, 1, "--channels", str(channels), "--precision", precision)
    assert one["strategy"] == "none"
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-3}
    for key, value in one["G"].items():
        torch.testing.assert_close(two["G"][key], value, **tol, msg=lambda m: f"G.{key}: {m}")


def test_the_exported_generator_is_contiguous_and_loads_into_a_plain_model(tmp_path):
    two, _ = job(tmp_path, 2, "--channels", "3", "--iters", "1")
    exported = two["exported"]
    assert exported.keys() == two["G"].keys()
    assert all(v.is_contiguous() and v.stride() == torch.empty(v.shape).stride() for v in exported.values())
    from gan_dist.config import load_config
    from gan_dist.models import model_spec

    cfg = load_config(None, ["model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "model.dcgan.norm=none",
                             "model.channels=3", "model.resolution=32"])
    G, _ = model_spec(cfg.model).build(0)
    G.load_state_dict(exported)
    for key, value in G.state_dict().items():
        assert torch.equal(value, two["G"][key]), key


def test_without_channels_last_the_weights_keep_their_layout(tmp_path):
    # NCHW throughout: matmul convolutions (the CPU default) return NHWC activations, so they are off
    two, err = job(tmp_path, 2, "--channels-last", "false", "--matmul-conv", "never")
    assert "Grad strides" not in err and two["mismatched"] == []
