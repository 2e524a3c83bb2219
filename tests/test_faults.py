"""The non-finite guard: a NaN/Inf loss or gradient skips that update on every rank, and too many
in a row stop the run with the last good checkpoint intact."""
from __future__ import annotations

import pytest
import torch

from gan_dist.checkpoint import verify
from gan_dist.config import load_config
from gan_dist.distributed import DistInfo
from gan_dist.faults import EXIT_NONFINITE, INJECT_NAN_ENV, NonFiniteGuard, parse_inject_nan
from gan_dist.loop import Batch, train_step
from gan_dist.build import setup_models
from gan_dist.parallel import build_strategy
from tests._ckpt import Ranks, assert_tensors_equal, latest, models, step_of, train, train_cmd
from tests._mp import base_env

INFO = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")


def snapshot(strategy) -> dict:
    return {"models": {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in strategy.raw.items()},
            "opt": {n: {k: {s: t.clone() for s, t in st.items()} for k, st in o.state_dict()["state"].items()}
                    for n, o in strategy.optimizers.items()}}


def test_a_nan_batch_skips_the_d_update_and_restores_batchnorm_statistics():
    cfg = load_config(None, ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "train.precision=fp32", "model.dcgan.norm=batch"])
    strategy = build_strategy(INFO, cfg)
    recipe, _, _ = setup_models(strategy, cfg, seed=1)
    guard = NonFiniteGuard(strategy)
    g = torch.Generator().manual_seed(0)
    batch = lambda: [[Batch(torch.rand(4, 1, 32, 32, generator=g) * 2 - 1, torch.randn(4, 16, generator=g))]]  # noqa: E731
    guard.before_step()
    train_step(strategy, recipe, batch())
    assert guard.after_step().item() == 0.0 and guard.streak == 0
    before = snapshot(strategy)
    (b,) = batch()[0]
    real, z = b.real, b.z
    guard.before_step()
    train_step(strategy, recipe, [[Batch(torch.full_like(real, float("nan")), z)]])
    assert guard.after_step().item() == 1.0 and strategy.skipped_updates == {"G": 0, "D": 1}
    after = snapshot(strategy)
    # D: weights, BatchNorm statistics and Adam state exactly as before the bad step
    assert_tensors_equal(after["models"]["D"], before["models"]["D"], "D")
    assert_tensors_equal(after["opt"]["D"], before["opt"]["D"], "Adam(D)")
    # G was updated: its loss only saw D on fakes, which stayed finite
    assert any(not torch.equal(v, before["models"]["G"][k]) for k, v in after["models"]["G"].items())
    assert all(torch.isfinite(v).all() for v in after["models"]["D"].values() if v.is_floating_point())
    assert guard.streak == 1
    guard.before_step()
    train_step(strategy, recipe, [[Batch(torch.full_like(real, float("inf")), z)]])
    guard.after_step()
    assert guard.streak == 2


@pytest.mark.parametrize("value, expected", [("1:3", (1, 3, 1)), ("0:5:0", (0, 5, 0)), ("2:1:4", (2, 1, 4)),
                                             ("", None)])
def test_inject_switch_parses(value, expected):
    assert parse_inject_nan(value) == expected


@pytest.mark.parametrize("value", ["1", "a:b", "1:0", "-1:3", "1:2:3:4"])
def test_inject_switch_rejects_garbage_naming_the_variable(value):
    with pytest.raises(ValueError, match=INJECT_NAN_ENV):
        parse_inject_nan(value)


def tb_scalars(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_nan_on_one_rank_is_skipped_on_all_ranks(tmp_path):
    """Rank 1's real batch of step 3 is NaN: after step 3, D and its Adam state are exactly those
    after step 2 on every rank, and every rank counted one skipped D update."""
    def job(name: str, steps: int, inject: str = "") -> tuple:
        run_dir = tmp_path / name
        ranks = Ranks(train_cmd(run_dir, f"train.steps={steps}", "train.log_every=1"), 2,
                      extra_env={INJECT_NAN_ENV: inject} if inject else None)
        codes = ranks.wait(300)
        assert codes == [0, 0], ranks.logs()
        return run_dir, ranks

    nan_dir, ranks = job("nan", 3, "1:3")
    clean_dir, _ = job("clean", 2)
    assert "step 3: NaN/Inf loss or gradient in the D update; skipped on every rank" in ranks.stderr(0)
    a, b = models(latest(nan_dir)), models(latest(clean_dir))
    assert step_of(latest(nan_dir)) == 3 and step_of(latest(clean_dir)) == 2
    assert_tensors_equal(a["models"]["D"], b["models"]["D"], "D")
    assert_tensors_equal(a["optimizers"]["D"], b["optimizers"]["D"], "Adam(D)")
    assert not torch.equal(a["models"]["G"][next(iter(a["models"]["G"]))],
                           b["models"]["G"][next(iter(b["models"]["G"]))])  # G stepped in step 3
    for r in (0, 1):
        rank_state = torch.load(latest(nan_dir) / f"rank{r:05d}.pt", weights_only=True)
        assert rank_state["skipped_updates"] == {"G": 0, "D": 1}, f"rank {r}"
    assert tb_scalars(nan_dir, "nonfinite/skipped_updates_D") == {1: 0.0, 2: 0.0, 3: 1.0}


@pytest.mark.timeout(300)
def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = base_env(**{INJECT_NAN_ENV: "0:5:0"})  # every step from step 5 on
    r = train(run_dir, "train.steps=50", "train.ckpt_every=2", "train.max_nonfinite=3", check=False, env=env)
    assert r.returncode == EXIT_NONFINITE, r.stderr[-3000:]
    assert "3 consecutive steps (up to step 7) had NaN/Inf" in r.stderr and "train.max_nonfinite=3" in r.stderr
    good = latest(run_dir)
    assert step_of(good) == 4 and str(good) in r.stderr  # nothing saved during the streak
    assert verify(good) is None
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step000000002", "step000000004"]
    assert all(torch.isfinite(v).all() for m in models(good)["models"].values() for v in m.values()
               if v.is_floating_point())
    assert not (run_dir / "generator.pt").exists()
    assert "Traceback" not in r.stderr


# the updates a NaN real batch spoils: Dmain (and Dreg when due); G's too when its loss reads D(x)
@pytest.mark.parametrize("reg, spoiled", [([], {"G": 0, "D": 1}),
                                          (["reg.r1_gamma=1", "reg.r2_gamma=1"], {"G": 0, "D": 1}),
                                          (["reg.r1_gamma=1", "reg.d_every=2", "train.loss=rpgan"], {"G": 1, "D": 2})],
                         ids=["plain", "penalties", "lazy-rpgan"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_and_guard_never_read_a_tensor_on_the_host(monkeypatch, precision, reg, spoiled):
    """The hot loop stays on the device: neither a good nor a NaN step calls .item(), .tolist()
    or bool()/float()/int() of a tensor (each would be a host sync on a GPU)."""
    cfg = load_config(None, ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16",
                             f"train.precision={precision}", *reg])
    strategy = build_strategy(INFO, cfg)
    recipe, _, _ = setup_models(strategy, cfg, seed=1)
    guard = NonFiniteGuard(strategy)
    g = torch.Generator().manual_seed(0)
    real, z = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1, torch.randn(4, 16, generator=g)
    train_step(strategy, recipe, [[Batch(real, z)]])  # first step: optimizer state is created

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host inside the training step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, host_read)
        for batch in (real, torch.full_like(real, float("nan"))):
            guard.before_step()
            train_step(strategy, recipe, [[Batch(batch, z)]], step=0)  # step 0: a lazy phase is due
            guard.after_step()
    assert strategy.skipped_updates == spoiled and guard.streak == 1
