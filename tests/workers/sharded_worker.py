"""One rank of a sharded-strategy job, started by tests/test_sharded_exact.py.

Every rank draws the same global batches from one seed and trains on its own slice, exactly as
tests/workers/ddp_worker.py does, so runs with different strategies see the same samples and
must end with the same weights. The optimizers are plain SGD unless --optim adam: Adam is
invariant to the scale of the gradients and would hide a reduction that sums instead of
averaging.

Optionally logs every torch.distributed collective of one iteration, labelled with the phase
(or step) it ran in, by wrapping the functions of torch.distributed: the calls still go to the
real process group. Writes, per rank, a dict to --out (see the end of main()).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist

from gan_dist import distributed as gdist
from gan_dist.config import load_config
from gan_dist.loop import train_step
from gan_dist.build import setup_models
from gan_dist.parallel import build_strategy
from tests.workers.batches import rank_batches

REDUCING = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
            "_reduce_scatter_base", "all_reduce_coalesced", "reduce_scatter_tensor_coalesced")
# StyleGAN2 at 32x32, 1 channel, at most 16 feature maps, 2 mapping layers (tests/test_stylegan2.py)
STYLEGAN2_TINY = ["model.resolution=32", "model.channels=1", "model.stylegan2.preset=none",
                  "model.stylegan2.channel_base=256", "model.stylegan2.channel_max=16",
                  "model.stylegan2.mapping_layers=2", "model.stylegan2.mbstd_group=4",
                  "model.stylegan2.conv_clamp=256", "model.stylegan2.z_dim=16", "model.stylegan2.w_dim=16"]
OTHER = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
         "all_gather_coalesced", "all_gather_into_tensor_coalesced", "broadcast", "scatter", "gather",
         "all_to_all", "all_to_all_single", "all_gather_object", "broadcast_object_list", "barrier")


def _numel(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_numel(o) for o in obj)
    return 0


def _payload(name: str, args: tuple, kwargs: dict):
    """The tensor(s) a collective sends: reduce-scatter/all-gather input, all-reduce buffer."""
    for key in ("input", "input_tensor", "input_list", "tensor", "tensors"):
        if key in kwargs:
            return kwargs[key]
    if name.startswith(("reduce_scatter", "_reduce_scatter", "all_gather", "_all_gather")) and len(args) > 1:
        return args[1]
    return args[0] if args else None


class CollectiveLog:
    """Every outermost torch.distributed collective while `active`: (label, name, elements)."""

    def __init__(self) -> None:
        self.active = False
        self.label = "outside"
        self.calls: list[tuple[str, str, int]] = []
        self.by_update: list[tuple[str, str, str, int]] = []  # (update, label, name, elements)
        self._depth = 0

    def install(self) -> None:
        for name in REDUCING + OTHER:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            outer = self._depth == 0
            self._depth += 1
            try:
                if outer and self.active:
                    self.calls.append((self.label, name, _numel(_payload(name, args, kwargs))))
                    self.by_update.append((getattr(self, "current", ""), self.label, name,
                                           _numel(_payload(name, args, kwargs))))
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapper

    def attach(self, strategy) -> None:
        """Label calls with the phase or step they happen in (the loop itself is untouched), and
        record which update of the iteration each call belongs to (`updates`)."""
        orig_phase, orig_step = strategy.phase, strategy.step
        self.update = {"G": 0, "D": 0}

        @contextlib.contextmanager
        def phase(trained, sync=True, double_backward=False):
            with orig_phase(trained, sync, double_backward):
                self.label = f"{trained}-phase"
                self.current = f"{trained}{self.update[trained]}"
                try:
                    yield
                finally:
                    self.label = "between"

        def step(trained):
            self.label = f"{trained}-step"
            try:
                orig_step(trained)
            finally:
                self.label = "between"
                if self.active:
                    self.update[trained] += 1

        strategy.phase, strategy.step = phase, step


def local_numel(p: torch.Tensor) -> int:
    """Elements of `p` stored on this rank: an FSDP shard, a ZeRO-3 partition or the whole."""
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.numel()


def _local(t: torch.Tensor) -> int:
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def optimizer_numel(opt) -> dict:
    """Elements the optimizer holds on this rank: the parameters it updates (ZeRO: this rank's
    fp32 partition) and its state (Adam moments)."""
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
    params = sum(_local(p) for g in inner.param_groups for p in g["params"])
    state = sum(_local(v) for st in inner.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "state": state}


def loss_scale(strategy, name: str):
    """The current fp16 loss scale of `name` (None without loss scaling)."""
    if hasattr(strategy, "engines"):
        scale = getattr(strategy.engines[name].optimizer, "loss_scale", None)
        return float(scale) if scale is not None and strategy.precision.name == "fp16" else None
    scaler = strategy.precision.scalers[name]
    return float(scaler.get_scale()) if scaler.is_enabled() else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="fsdp")
    p.add_argument("--zero-stage", type=int, default=None)
    p.add_argument("--ds-config", default=None, help="a DeepSpeed JSON (parallel.deepspeed.config)")
    p.add_argument("--break-freeze", action="store_true",
                   help="deliberately run the G phase with D live (D's engine, D requiring grad): "
                        "shows that the collective log catches D's gradients being reduced")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--d-steps", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--norm", default="none")
    p.add_argument("--optim", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--reshard", default="true")
    p.add_argument("--loss", default="nonsaturating")
    p.add_argument("--r1", type=float, default=0.0, help="reg.r1_gamma")
    p.add_argument("--r2", type=float, default=0.0, help="reg.r2_gamma")
    p.add_argument("--d-every", type=int, default=1, help="reg.d_every")
    p.add_argument("--matmul-conv", default="auto")
    p.add_argument("--model", choices=["dcgan", "stylegan2", "r3gan"], default="dcgan",
                   help="stylegan2: tiny widths, style mixing and noise drawn per sample, lazy path length")
    p.add_argument("--pl-every", type=int, default=2, help="model.stylegan2.pl_every")
    p.add_argument("--pl-weight", type=float, default=2.0, help="model.stylegan2.pl_weight (0: no Greg)")
    p.add_argument("--num-classes", type=int, default=0, help="model.num_classes: labelled batches, conditional G and D")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="another config override, e.g. augment.kind=ada")
    p.add_argument("--count-iter", type=int, default=-1, help="log the collectives of this iteration")
    p.add_argument("--save-at", type=int, default=0, help="save a checkpoint after this many iterations")
    p.add_argument("--ckpt", default=None, help="checkpoint directory to save into (or load from)")
    p.add_argument("--resume", action="store_true", help="load --ckpt, then run the remaining iterations")
    args = p.parse_args()

    log = CollectiveLog()
    log.install()
    info = gdist.init_distributed(timeout_s=120)
    W, r = info.world_size, info.rank
    overrides = [f"train.precision={args.precision}", f"model.dcgan.norm={args.norm}", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8",
                 "model.dcgan.nz=16", f"train.grad_accum={args.accum}", f"train.d_steps={args.d_steps}",
                 f"train.batch_size={args.global_batch // (W * args.accum)}",
                 f"parallel.strategy={args.strategy}", f"parallel.fsdp.reshard_after_forward={args.reshard}",
                 f"train.loss={args.loss}", f"reg.r1_gamma={args.r1}", f"reg.r2_gamma={args.r2}",
                 f"reg.d_every={args.d_every}", f"train.matmul_conv={args.matmul_conv}"]
    if args.model == "stylegan2":
        overrides += ["model.arch=stylegan2", *STYLEGAN2_TINY, f"model.stylegan2.pl_every={args.pl_every}",
                      f"model.stylegan2.pl_weight={args.pl_weight}"]
    if args.model == "r3gan":  # tiny widths: 16 channels, 4 groups, one block per stage (32x32, 1 channel)
        overrides += ["model.arch=r3gan", "model.r3gan.preset=tiny"]
    overrides += [f"model.num_classes={args.num_classes}", *args.extra]
    if args.zero_stage is not None:
        overrides.append(f"parallel.deepspeed.zero_stage={args.zero_stage}")
    if args.ds_config is not None:
        overrides.append(f"parallel.deepspeed.config={args.ds_config}")
    cfg = load_config(None, overrides)
    strategy = build_strategy(info, cfg)
    sgd = (lambda name, params, **kw: torch.optim.SGD(params, lr=0.5)) if args.optim == "sgd" else None
    recipe, spec, _ = setup_models(strategy, cfg, seed=3, make_optimizer=sgd)
    if args.break_freeze:
        from gan_dist.parallel.base import Strategy

        def live_phase(trained, sync=True, double_backward=False):
            if hasattr(strategy, "engines"):
                strategy.engines[trained].set_gradient_accumulation_boundary(sync)
            return Strategy.no_sync(strategy, trained)  # a null context: D stays live in the G phase
        strategy.phase = live_phase
    log.attach(strategy)
    if strategy.name == "ddp":
        # DDP reduces in C++; its Python all-reduce hook (the same arithmetic) goes through
        # torch.distributed.all_reduce, which the log sees
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        for name in ("G", "D"):
            strategy.wrapped[name].register_comm_hook(None, allreduce_hook)

    gen = torch.Generator().manual_seed(1234)
    first = 0
    if args.resume:
        strategy.load_checkpoint(Path(args.ckpt))
        first = args.save_at
    d_grads_in_g_phase = []
    for it in range(args.iters):
        batches = rank_batches(gen, args.global_batch, args.d_steps, args.accum, r, W, spec.z_dim, args.num_classes)
        for j, micro in enumerate(batches):  # G's other per-sample inputs, by global sample index
            for m, b in enumerate(micro):
                lo = (it * args.d_steps + j) * args.global_batch + (r * args.accum + m) * len(b.z)
                b.g_inputs = spec.draw_g_inputs(cfg.run.seed, range(lo, lo + len(b.z)), b.z.device)
                b.index = range(lo, lo + len(b.z))  # what the augmentation's draws are keyed by
        if it < first:
            continue  # the resumed run skips the batches the saved run already used
        log.active = it == args.count_iter
        train_step(strategy, recipe, batches, it)
        log.active = False
        d_grads_in_g_phase.append(any(p.grad is not None for p in strategy.raw["D"].parameters()))
        if args.ckpt and not args.resume and it + 1 == args.save_at:
            if info.is_main:
                Path(args.ckpt).mkdir(parents=True, exist_ok=True)
            gdist.barrier()
            strategy.save_checkpoint(Path(args.ckpt))

    strategy.sync_buffers()
    full = {n: strategy.full_state_dict(n) for n in ("G", "D")}
    out = {"G": full["G"], "D": full["D"], "strategy": strategy.name, "world_size": W, "rank": r,
           "numel": {n: sum(getattr(p, "ds_numel", p.numel()) for p in strategy.raw[n].parameters()) for n in ("G", "D")},
           "local_numel": {n: sum(local_numel(p) for p in strategy.raw[n].parameters()) for n in ("G", "D")},
           "optim_numel": {n: optimizer_numel(strategy.optimizers[n]) for n in ("G", "D")},
           "released": {n: all(p.data.numel() == 0 for p in strategy.raw[n].parameters()) for n in ("G", "D")},
           "loss_scale": {n: loss_scale(strategy, n) for n in ("G", "D")},
           "skipped": dict(strategy.skipped_updates),
           "collectives": log.calls, "collectives_by_update": log.by_update,
           "d_grads_in_g_phase": d_grads_in_g_phase,
           "recipe_state": recipe.state_dict(),  # e.g. ADA's p
           "param_dtypes": sorted({str(p.dtype) for n in ("G", "D") for p in strategy.raw[n].parameters()})}
    torch.save(out, args.out)
    strategy.close()
    del strategy
    gdist.teardown()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
