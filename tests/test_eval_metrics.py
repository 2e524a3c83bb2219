"""Evaluation pieces in one process: sample splitting, latents, the KID fast path, extractors
(Inception weights: found, missing, broken), reference-statistics caching, the evaluator end to end."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_dist.config import ConfigError, load_config
from gan_dist.metrics import frechet
from gan_dist.metrics.evaluation import (Evaluator, Reference, dataset_reference, parse_metrics, plan_metrics,
                                         reference_cache_paths, training_evaluator)
from gan_dist.metrics.extractors import (INCEPTION_ENV, INCEPTION_FILE, DigitsExtractor, InceptionExtractor,
                                         VGG16Extractor, resolve_extractor_name)
from gan_dist.metrics.sources import ShardSource
from gan_dist.metrics.shares import LATENT_BLOCK, latents, share, share_counts


# ---- splitting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 37, 1000])
def test_share_covers_every_index_exactly_once(n, world):
    ranges = [share(n, r, world) for r in range(world)]
    indices = [i for s, e in ranges for i in range(s, e)]
    assert indices == list(range(n))  # contiguous, in rank order, no gaps, no repeats
    counts = share_counts(n, world)
    assert sum(counts) == n and max(counts) - min(counts) <= 1


def test_share_rejects_impossible_splits():
    with pytest.raises(ValueError):
        share(10, 2, 2)
    with pytest.raises(ValueError):
        share(-1, 0, 1)


def test_latents_do_not_depend_on_how_the_range_is_split():
    n = 2 * LATENT_BLOCK + 300
    whole = latents(0, n, 8, seed=5)
    for cuts in ([LATENT_BLOCK], [LATENT_BLOCK - 1, LATENT_BLOCK + 1], [17, 1500, 2100]):
        bounds = [0, *cuts, n]
        parts = torch.cat([latents(a, b, 8, seed=5) for a, b in zip(bounds, bounds[1:])])
        assert torch.equal(parts, whole)
    assert not torch.equal(latents(0, 10, 8, seed=6), whole[:10])
    assert latents(5, 5, 8, 0).shape == (0, 8)
    assert abs(whole.mean().item()) < 0.05 and abs(whole.std().item() - 1) < 0.05


# ---- KID: the kernel-matrix path equals the per-subset path ----------------------------------------
def test_kid_kernel_cache_path_equals_per_subset_path(monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 12)), rng.normal(size=(350, 12)) + 0.2
    fast = frechet.kernel_inception_distance(x, y, num_subsets=50, subset_size=200, seed=3)
    monkeypatch.setattr(frechet, "KERNEL_CACHE_MAX", 0)
    slow = frechet.kernel_inception_distance(x, y, num_subsets=50, subset_size=200, seed=3)
    assert fast[0] == pytest.approx(slow[0], rel=1e-10, abs=1e-14)
    assert fast[1] == pytest.approx(slow[1], rel=1e-8, abs=1e-14)
    assert fast[0] > 0


# ---- extractors -------------------------------------------------------------------------------------
@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    """An offline machine without the Inception weights anywhere gan_dist looks."""
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.delenv("GAN_DIST_VGG16_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def test_missing_inception_weights_give_an_error_that_says_how_to_provide_them(no_inception):
    with pytest.raises(ConfigError) as err:
        InceptionExtractor(torch.device("cpu"))
    msg = str(err.value)
    for needed in ("eval.inception_weights", INCEPTION_ENV, INCEPTION_FILE, "2015-12-05",
                   "https://github.com/toshas/torch-fidelity/releases", "eval.extractor=digits",
                   str(no_inception / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE)):
        assert needed in msg
    assert not (no_inception / "torch_home").exists() or not any((no_inception / "torch_home").rglob("*.pth"))
    with pytest.raises(ConfigError, match="eval.vgg16_weights.*GAN_DIST_VGG16_WEIGHTS.*vgg16-397923af.pth"):
        VGG16Extractor(torch.device("cpu"))


def test_missing_inception_weights_stop_training_before_it_starts(no_inception):
    from tests._mp import PYTHON, REPO, base_env, run
    from tests.conftest import TINY

    env = base_env(TORCH_HOME=str(no_inception / "torch_home"))
    env.pop(INCEPTION_ENV, None)
    res = run([PYTHON, "-m", "gan_dist.train", *TINY, f"run.dir={no_inception / 'run'}", "eval.enabled=true",
               "eval.extractor=inception", "data.num_workers=0"], timeout=120, env=env, cwd=REPO, check=False)
    assert res.returncode == 2
    assert "eval.inception_weights" in res.stderr and INCEPTION_ENV in res.stderr
    assert "Traceback" not in res.stderr
    assert not (no_inception / "run" / "generator.pt").exists()


def test_configured_inception_path_that_does_not_exist_is_named(no_inception, monkeypatch):
    with pytest.raises(ConfigError, match="eval.inception_weights='/nowhere/x.pth': no such file"):
        InceptionExtractor(torch.device("cpu"), weights="/nowhere/x.pth")
    monkeypatch.setenv(INCEPTION_ENV, "/nowhere/y.pth")
    with pytest.raises(ConfigError, match=f"{INCEPTION_ENV}='/nowhere/y.pth'"):
        InceptionExtractor(torch.device("cpu"))


class _Payload:
    """Unpickling this would create a file: a weights file must never run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_wrong_or_damaged_weight_files_are_rejected_by_name(no_inception):
    other = no_inception / "not_inception.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match="not_inception.pth.*holds other weights than the 2015-12-05 TensorFlow Inception"):
        InceptionExtractor(torch.device("cpu"), weights=str(other))
    damaged = no_inception / "damaged.pth"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match="damaged.pth.*cannot be loaded.*2015-12-05"):
        InceptionExtractor(torch.device("cpu"), weights=str(damaged))
    marker = no_inception / "code_ran"
    evil = no_inception / "evil.pth"
    torch.save({"x": _Payload(str(marker))}, evil)
    with pytest.raises(ConfigError, match="evil.pth.*cannot be loaded"):
        InceptionExtractor(torch.device("cpu"), weights=str(evil))
    assert not marker.exists()
    from torchvision.models import inception_v3

    tv = no_inception / "inception_v3_google-0cc3c7bd.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tv)
    with pytest.raises(ConfigError, match="torchvision's ImageNet InceptionV3"):
        InceptionExtractor(torch.device("cpu"), weights=str(tv))
    with pytest.raises(ConfigError, match="not_inception.pth.*holds other weights than the torchvision ImageNet VGG16"):
        VGG16Extractor(torch.device("cpu"), weights=str(other))


def test_inception_extractor_loads_a_local_weights_file(no_inception, monkeypatch):
    """torch-fidelity's 2015-12-05 Inception with weights from a file (random ones here: nothing is downloaded)."""
    from tests._metric_weights import write_inception

    path = write_inception(no_inception)
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    ex = InceptionExtractor(torch.device("cpu"))
    assert ex.fd_key == "fid" and ex.identity.startswith("inception-")
    gray = torch.rand(2, 1, 32, 32) * 2 - 1
    out = ex(gray)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["features"]).all() and out["features"].std() > 1e-3
    # gray images are embedded as RGB with three equal channels
    torch.testing.assert_close(out["features"], ex(gray.expand(-1, 3, -1, -1))["features"])
    assert resolve_extractor_name(load_config(None, ["data.urls=/x"]).eval, demo_data=False) == "inception"
    # found in torch's hub cache under its published name, without any setting
    monkeypatch.delenv(INCEPTION_ENV)
    cached = no_inception / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    path.rename(cached)
    assert InceptionExtractor(torch.device("cpu")).path == cached


def test_metric_lists_are_checked_and_planned():
    assert parse_metrics("fid, KID,is,pr") == ["fid", "kid", "is", "pr"]
    with pytest.raises(ConfigError, match="eval.metrics.*unknown metric 'fd'"):
        parse_metrics("fid,fd")
    plan = plan_metrics(["fid", "kid", "pr"])
    assert plan.extractor_names == {"main": "inception", "pr": "vgg16"}
    assert plan_metrics(["kid"], "digits").extractor_names == {"main": "digits"}
    assert plan_metrics(["pr"]).extractor_names == {"pr": "vgg16"}
    with pytest.raises(ConfigError, match="digits_fd and fid/is"):
        plan_metrics(["digits_fd", "fid"])
    with pytest.raises(ConfigError, match="eval.extractor=digits"):
        plan_metrics(["is"], "digits")
    with pytest.raises(ConfigError, match="eval.metrics"):
        training_evaluator(load_config(None, ["eval.metrics=fid,bogus"]), [], torch.device("cpu"), True)


def test_auto_extractor_choice(no_inception):
    cfg = load_config(None, [])
    assert resolve_extractor_name(cfg.eval, demo_data=True) == "digits"
    assert resolve_extractor_name(cfg.eval, demo_data=False) is None  # no weights: no evaluation
    assert resolve_extractor_name(load_config(None, ["eval.extractor=inception"]).eval, False) == "inception"


def test_digits_metrics_refuse_images_that_are_not_digits(no_inception):
    cfg = load_config(None, ["model.channels=3", "model.resolution=64", "eval.extractor=digits"])
    with pytest.raises(ConfigError, match="eval.extractor=digits measures 1 x 32 x 32"):
        training_evaluator(cfg, ["/unused.tar"], torch.device("cpu"), True)
    assert training_evaluator(load_config(None, ["eval.enabled=false"]), [], torch.device("cpu"), True) is None


# ---- reference statistics and the evaluator ----------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from gan_dist.data.demo import demo_images, ensure_demo_shards

    return ensure_demo_shards(), demo_images()[0]


def test_reference_is_cached_next_to_the_shards_and_invalidated_when_they_change(demo, tmp_path):
    import shutil

    urls = [str(shutil.copy(u, tmp_path)) for u in demo[0][:3]]
    ex = DigitsExtractor(torch.device("cpu"))
    ref = dataset_reference(urls, ex, 1, 32, log=lambda m: None)
    assert ref.path.parent == tmp_path and ref.path.is_file()
    assert 300 < ref.n < 400 and ref.mu.shape == (128,) and ref.sigma.shape == (128, 128)
    stamp = ref.path.stat().st_mtime_ns
    cached = dataset_reference(urls, ex, 1, 32, log=lambda m: None)
    assert cached.path == ref.path and ref.path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(cached.sigma, ref.sigma)
    os.utime(urls[0], (1, 1))  # a shard changed: new statistics, a new file
    assert reference_cache_paths(ShardSource(urls, 1, 32), ex.identity, ref.n)[0] != ref.path
    # another number of images or another network: another file
    assert dataset_reference(urls, ex, 1, 32, max_images=100, log=lambda m: None).path != ref.path
    # a read-only shard directory: the gan_dist cache directory instead
    tmp_path.chmod(0o555)
    try:
        if not os.access(tmp_path, os.W_OK):  # root ignores the mode
            assert reference_cache_paths(ShardSource(urls, 1, 32), ex.identity, 10)[0].parent.name == "refstats"
    finally:
        tmp_path.chmod(0o755)


def test_evaluator_on_the_real_images_gives_zero_distance_and_full_coverage(demo):
    urls, images = demo
    ex = DigitsExtractor(torch.device("cpu"))
    ref = dataset_reference(urls, ex, 1, 32, log=lambda m: None)
    real = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)  # exactly what the shards hold
    order = iter(range(len(real)))

    def generate(z: torch.Tensor) -> torch.Tensor:  # "generates" the dataset, image by image
        return real[[next(order) for _ in range(len(z))]]

    ev = Evaluator(ex, ref, num_samples=len(real), nz=4, batch_size=500, kid_subsets=10)
    result = ev.run(generate)
    assert result["num_samples"] == len(real) == ref.n
    assert result["digits_fd"] < 1e-3  # float32 features, another order: rounding only
    assert abs(result["kid"]) < 0.5  # unbiased: scatters around 0 (noise images: > 5)
    assert result["class_coverage"] == 10 and result["confident_fraction"] > 0.95

    noise = Evaluator(ex, ref, num_samples=300, nz=1024, batch_size=300, kid_subsets=10)
    bad = noise.run(lambda z: z.view(-1, 1, 32, 32).clamp(-1, 1))
    assert bad["digits_fd"] > 100 and bad["kid"] > 5


def test_reference_from_features_keeps_a_bounded_kid_subset():
    feats = np.random.default_rng(0).normal(size=(12_000, 4))
    ref = Reference.from_features(feats)
    assert ref.n == 12_000 and len(ref.features) == 10_000 and ref.features.dtype == np.float32
    np.testing.assert_allclose(ref.mu, feats.mean(0))


# ---- image sources: folders and shards, split by index ------------------------------------------------
def test_shard_and_folder_sources_split_into_index_ranges_exactly(demo, tmp_path):
    from PIL import Image

    from gan_dist.metrics.sources import FolderSource, open_source

    urls, images = demo
    source = ShardSource(urls)
    assert source.count() == 1797 and len(urls) > 1
    whole = torch.stack(list(source.images(0, 1797)))
    assert whole.shape == (1797, 1, 32, 32)
    assert whole.double().sum() == float(images.astype(np.float64).sum())  # the demo images, in shard order
    cuts = [0, 5, 600, 601, 1797]  # ranges that start and end inside and across shards
    parts = torch.cat([torch.stack(list(source.images(a, b))) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(parts, whole)
    assert isinstance(open_source(str(Path(urls[0]).parent)), ShardSource)

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(images[0]).save(folder / "b.png")
    Image.fromarray(np.zeros((5, 7, 4), np.uint8), "RGBA").save(folder / "sub" / "a.png")
    Image.fromarray(images[1]).save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    src = open_source(str(folder))
    assert isinstance(src, FolderSource) and [p.name for p in src.files] == ["a.png", "b.png", "a.png"]
    got = list(src.images(0, 3))
    assert torch.equal(got[0][0], torch.from_numpy(images[1])) and got[0].shape == (1, 32, 32)
    assert got[2].shape == (3, 5, 7)  # RGBA -> RGB, stored size
    assert any("RGBA" in n for n in src.notes)
    with pytest.raises(Exception, match="fewer than --n 4.*--n all"):
        src.resolve_n(4, "--fake")


def test_images_of_mixed_sizes_are_batched_by_shape():
    from gan_dist.metrics.evaluation import _uniform_batches

    imgs = [torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2 + [torch.full((1, 4, 4), 255, dtype=torch.uint8)] \
        + [torch.zeros(3, 8, 8, dtype=torch.uint8)] * 3
    seen: set[int] = set()
    batches = list(_uniform_batches(imgs, 2, seen))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 1, 4, 4), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert batches[1].max() == 1.0 and batches[0].min() == -1.0 and seen == {1, 3}
