"""Class labels end to end: the reader hands each image's `.cls` label with it, bad labels are
bad samples (skipped and counted, never label 0), model.num_classes=auto comes from the data,
fakes get labels drawn by global sample index, the conditional DCGAN (label embedding in G,
projection D) uses them, and 2 processes x b equal 1 process x 2b with labels under every strategy."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from gan_dist.build import fake_labels
from gan_dist.config import load_config
from gan_dist.data import build_loader, resolve_shards
from gan_dist.data.index import DataError
from tests._mp import PYTHON, REPO, base_env, run
from tests.conftest import TINY
from tests.workers.data_shards import add, data_cfg, encode_png, image_for
from tests.workers.sharded_worker import STYLEGAN2_TINY

pytestmark = pytest.mark.timeout(600)
QUIET = lambda m: None  # noqa: E731
SMALL = ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16"]


def labelled_shard(path: Path, labels: dict[str, bytes | None], resolution: int = 8) -> None:
    """A shard of PNG samples whose `.cls` member holds the given bytes (None: no `.cls`)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, cls in labels.items():
            add(tar, f"{key}.png", encode_png(image_for(key, 1, resolution)))
            if cls is not None:
                add(tar, f"{key}.cls", cls)


def read_all(urls: list[str], num_classes: int, batch: int = 2, batches: int = 3, **data: object):
    shards = resolve_shards(data_cfg(urls, mode="stream", **data), need_counts=False, log=QUIET)
    loader = build_loader(shards, data_cfg(urls, mode="stream", **data), 1, 8, batch, 0, 0, 1,
                          torch.device("cpu"), QUIET, num_classes=num_classes)
    out = [loader.next_batch() for _ in range(batches)]
    stats = loader.stats()
    loader.close()
    return out, stats


def test_reader_yields_each_image_with_its_label(tmp_path):
    labels = {f"k{i:02d}": str(i % 5).encode() for i in range(6)}
    labelled_shard(tmp_path / "a-000000.tar", labels)
    out, _ = read_all([str(tmp_path / "a-000000.tar")], num_classes=5)
    seen = {}
    for b in out:
        assert b.labels is not None and b.labels.dtype == torch.long
        for key, label, img in zip(b.keys, b.labels.tolist(), b.images):
            seen[key] = label
            expected = torch.from_numpy(image_for(key, 1, 8)).permute(2, 0, 1).float() / 127.5 - 1
            torch.testing.assert_close(img, expected)  # the label travels with its own image
    assert seen == {k: int(v) for k, v in labels.items()}
    plain, _ = read_all([str(tmp_path / "a-000000.tar")], num_classes=0)
    assert plain[0].labels is None  # an unconditional model reads no labels


def test_missing_or_unreadable_label_is_a_bad_sample_never_label_0(tmp_path):
    labels = {"k00": b"1", "k01": None, "k02": b"one", "k03": b"2", "k04": b"-3", "k05": b"1"}
    labelled_shard(tmp_path / "a-000000.tar", labels)
    out, stats = read_all([str(tmp_path / "a-000000.tar")], num_classes=3, batches=2, max_skip_fraction=1.0)
    keys = [k for b in out for k in b.keys]
    assert set(keys) <= {"k00", "k03", "k05"} and 0 not in [c for b in out for c in b.labels.tolist()]
    assert stats["by_reason"].get("no_label", 0) >= 1 and stats["by_reason"].get("bad_label", 0) >= 2


def test_label_beyond_num_classes_names_the_key_and_shard(tmp_path):
    labelled_shard(tmp_path / "a-000000.tar", {"k00": b"0", "k01": b"7"})
    with pytest.raises(DataError, match=r"sample 'k01' of shard '.*a-000000\.tar' has label 7.*model\.num_classes=3"):
        read_all([str(tmp_path / "a-000000.tar")], num_classes=3)


def test_fake_labels_are_a_function_of_the_global_index():
    whole = fake_labels(5, 10, range(0, 64), torch.device("cpu"))
    halves = torch.cat([fake_labels(5, 10, range(0, 32), "cpu"), fake_labels(5, 10, range(32, 64), "cpu")])
    assert torch.equal(whole, halves) and whole.min() >= 0 and whole.max() < 10
    assert len(set(whole.tolist())) > 5
    # train.fake_labels=data: the data's frequencies (class 1 nine times as frequent, class 2 never)
    drawn = fake_labels(5, 3, range(4000), "cpu", class_counts=[100, 900, 0])
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert share[2] == 0 and abs(share[1].item() - 0.9) < 0.03


def test_conditional_dcgan_depends_on_the_label():
    from gan_dist.models import model_spec

    cfg = load_config(None, [*SMALL, "model.num_classes=4", "model.dcgan.norm=none"])
    spec = model_spec(cfg.model)
    G, D = spec.build(0)
    assert spec.num_classes == 4 and G.embed is not None and D.project is not None
    z = torch.randn(3, 16)
    x0, x1 = G(z, torch.tensor([0, 0, 0])), G(z, torch.tensor([1, 1, 1]))
    assert (x0 - x1).abs().max() > 1e-4
    d0, d1 = D(x0, torch.tensor([0, 0, 0])), D(x0, torch.tensor([2, 2, 2]))
    assert d0.shape == (3,) and (d0 - d1).abs().max() > 0.1 * d0.abs().max()  # the projection term counts
    with pytest.raises(ValueError, match="conditional"):
        G(z)
    # unconditional: the networks and their parameter names are those of before
    plain = model_spec(load_config(None, [*SMALL, "model.dcgan.norm=none"]).model)
    G0, D0 = plain.build(0)
    assert not any("embed" in k or "project" in k for k in [*G0.state_dict(), *D0.state_dict()])


def test_num_classes_auto_and_fake_label_frequencies_from_the_demo_data(tmp_path):
    from gan_dist.data import ensure_demo_shards
    from gan_dist.trainer import resolve_data_shape

    urls = ensure_demo_shards()
    cfg = load_config(None, ["model.num_classes=auto", "train.fake_labels=data"])
    used = resolve_data_shape(cfg, urls, True)
    assert cfg.model.num_classes == 10 and "num_classes" in used["auto"]
    assert len(used["class_counts"]) == 10 and sum(used["class_counts"]) == 1797


def _train(tmp_path: Path, *extra: str):
    return run([PYTHON, "-m", "gan_dist.train", *TINY, f"run.dir={tmp_path / 'run'}", *extra],
               timeout=300, check=False, env=base_env(), cwd=REPO)


def test_too_few_classes_for_the_data_exits_2_naming_the_key(tmp_path):
    r = _train(tmp_path, "model.num_classes=3")
    assert r.returncode == 2, r.stderr
    assert "model.num_classes=3" in r.stderr and "labels up to 9" in r.stderr


def test_conditional_model_on_unlabelled_shards_exits_2_naming_the_shards(tmp_path):
    from tests.workers.data_shards import make_shards

    urls, _ = make_shards(tmp_path / "plain", [4, 4], resolution=32)
    for u in urls:  # the same images without their `.cls` members
        with tarfile.open(u) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if not m.name.endswith(".cls")]
        with tarfile.open(u, "w", format=tarfile.USTAR_FORMAT) as dst:
            for m, data in members:
                add(dst, m.name, data)
    r = _train(tmp_path, "model.num_classes=auto", f"data.urls={tmp_path / 'plain'}", "data.mode=stream")
    assert r.returncode == 2, r.stderr
    assert "no class labels" in r.stderr and "plain" in r.stderr


def test_conditional_demo_trains_with_labels_and_generates_by_class(tmp_path):
    import json

    from PIL import Image

    r = _train(tmp_path, "model.num_classes=auto", "train.steps=2")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["data_shape"]["num_classes"] == 10 and (tmp_path / "run" / "samples.png").is_file()
    gen = [PYTHON, "-m", "gan_dist.generate", "--ckpt", str(tmp_path / "run")]
    run([*gen, "--n", "30", "--out", str(tmp_path / "grid.png")], cwd=REPO)
    w, h = Image.open(tmp_path / "grid.png").size
    assert (w, h) == (2 + 3 * 34, 2 + 10 * 34)  # one row of 3 per class, 32 px + 2 px padding
    run([*gen, "--n", "6", "--class", "3", "--out", str(tmp_path / "threes.tar")], cwd=REPO)
    with tarfile.open(next(tmp_path.glob("threes-*.tar"))) as tar:
        labels = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")]
    assert labels == [b"3"] * 6  # generated shards carry the class each image was made for
    bad = run([*gen, "--n", "4", "--class", "10", "--out", str(tmp_path / "x.png")], cwd=REPO, check=False)
    assert bad.returncode == 2 and "--class 10" in bad.stderr and "model.num_classes=10" in bad.stderr


def test_class_metrics_tell_the_asked_for_digit():
    """Intra-class FD and classifier accuracy of a 'generator' that returns real digits: of the
    asked-for class (a perfect one) or of the next class (one that ignores the label)."""
    from gan_dist.data.demo import demo_images
    from gan_dist.metrics.conditional import ClassEvaluator
    from gan_dist.metrics.extractors import DigitsExtractor

    images, labels = demo_images()
    x, y = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    ev = ClassEvaluator(DigitsExtractor(torch.device("cpu")), x, y, 10, per_class=40, z_dim=4)

    def real_of(shift):
        def generate(z, c):
            picks = [torch.nonzero(y == (int(k) + shift) % 10)[i % 100, 0] for i, k in enumerate(c)]
            return x[torch.stack(picks)].float() / 127.5 - 1
        return generate
    good, wrong = ev.run(real_of(0)), ev.run(real_of(1))
    assert good["class_accuracy"] > 0.95 and wrong["class_accuracy"] < 0.1
    assert good["intra_fd"] * 5 < wrong["intra_fd"] and set(good) >= {"intra_fd/0", "class_accuracy/9"}


# ---- 2 processes x b == 1 process x 2b, with labels ---------------------------------------------
def assert_same_weights(a: dict, b: dict, num_classes: int, model: tuple[str, ...] = ()) -> None:
    """Equal weights (as tests/test_sharded_exact.py checks them), for the workers' conditional
    models (`model`: the overrides of a family other than DCGAN): far from their initial values,
    so that the comparison proves something."""
    from gan_dist.models import build_models

    cfg = load_config(None, [*SMALL, "model.dcgan.norm=none", *model, f"model.num_classes={num_classes}"])
    init = dict(zip(("G", "D"), (m.state_dict() for m in build_models(cfg.model, seed=3))))
    moved = 0.0
    for model in ("G", "D"):
        assert a[model].keys() == b[model].keys() == init[model].keys()
        for key, value in a[model].items():
            torch.testing.assert_close(value, b[model][key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{model}.{key}: {m}")
            moved = max(moved, (value - init[model][key]).abs().max().item())
    assert moved > 5e-4, "training did not change the weights: the comparison would prove nothing"


LABELLED = ("--global-batch", "8", "--iters", "3", "--num-classes", "5", "--r1", "100", "--d-every", "2")


@pytest.fixture(scope="module")
def conditional_reference(tmp_path_factory):
    from tests.test_recipe_exact import job

    return job(tmp_path_factory.mktemp("one"), "cond", 1, "--strategy", "none", *LABELLED)[0]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_conditional_two_processes_equal_one(tmp_path, conditional_reference, name):
    from tests.test_recipe_exact import STRATEGIES, job

    r0, _ = job(tmp_path, name, 2, *STRATEGIES[name], *LABELLED)
    assert_same_weights(r0, conditional_reference, num_classes=5)
    assert any("project" in k for k in r0["D"]) and any("embed" in k for k in r0["G"])


@pytest.mark.multiproc
def test_labels_change_the_run(tmp_path, conditional_reference):
    """The comparison above would prove nothing if the labels had no effect."""
    from tests.test_recipe_exact import job

    args = list(LABELLED)
    args[args.index("--num-classes") + 1] = "3"  # other labels, the same shapes but for the embeddings
    other = job(tmp_path, "other", 1, "--strategy", "none", *args)[0]
    key = "blocks.0.0.weight"
    assert (other["D"][key] - conditional_reference["D"][key]).abs().max() > 1e-4


# The other families, on the strategies whose handling depends on a family's layers (the
# strategy code is shared with DCGAN's runs above): FSDP2 (the label layers are units or inside
# one) and ZeRO-3 (every parameter gathered by hooks). Per family: the worker's arguments, the
# overrides that rebuild its initial weights, and the label layers G and D must hold.
# StyleGAN2: the label embedded in G's mapping, D projecting onto its own label mapping, through
# all four phases. R3GAN: a class embedding concatenated to z in G's basis input, D's logit a
# projection onto a class embedding, R1 + R2 in every D step.
LABELLED_FAMILIES = {
    "stylegan2": (("--model", "stylegan2", "--global-batch", "8", "--iters", "3", "--num-classes", "5", "--r1", "10",
                   "--d-every", "2", "--pl-every", "2"),
                  ("model.arch=stylegan2", *STYLEGAN2_TINY),
                  lambda G, D: "mapping.embed.weight" in G and "mapping.embed.weight" in D),
    "r3gan": (("--model", "r3gan", "--global-batch", "8", "--iters", "3", "--num-classes", "5", "--loss", "rpgan",
               "--r1", "2", "--r2", "2", "--d-every", "1"),
              ("model.arch=r3gan", "model.r3gan.preset=tiny"),
              lambda G, D: "embed.weight" in G and any("embed" in k for k in D)),
}


@pytest.fixture(scope="module")
def family_reference(tmp_path_factory):
    """family -> its one-process run (made once per module)."""
    from tests.test_recipe_exact import job

    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            args = LABELLED_FAMILIES[family][0]
            done[family] = job(tmp_path_factory.mktemp(f"{family}-one"), family, 1, "--strategy", "none", *args)[0]
        return done[family]
    return get


@pytest.mark.multiproc
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family,name", [(f, n) for f in LABELLED_FAMILIES for n in ("fsdp", "zero3")])
def test_other_families_conditional_two_processes_equal_one(tmp_path, family_reference, family, name):
    from tests.test_recipe_exact import STRATEGIES, job

    args, model, has_label_layers = LABELLED_FAMILIES[family]
    r0, _ = job(tmp_path, f"{family}-{name}", 2, *STRATEGIES[name], *args)
    assert_same_weights(r0, family_reference(family), 5, model)
    assert has_label_layers(r0["G"], r0["D"])
