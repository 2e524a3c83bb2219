"""Shared test setup: the demo-data cache lives in a per-session temporary directory."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    if "GAN_DIST_CACHE" not in os.environ:
        os.environ["GAN_DIST_CACHE"] = str(tmp_path_factory.mktemp("gan_dist_cache"))
    yield


TINY = ["model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "train.batch_size=8", "train.steps=4",
        "data.num_workers=1", "train.precision=fp32", "run.threads=1", "train.log_every=2",
        "data.shuffle_buffer=50", "eval.enabled=false"]
