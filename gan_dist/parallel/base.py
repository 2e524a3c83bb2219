"""The small interface the training loop talks to, and the part every strategy shares.

The loop asks questions ("which callable is G?", "enter the D phase", "backward this loss
for D", "step D"); each strategy answers them. The phase contexts are where the exact
gradient syncing lives:

* ``phase("D", sync)``: D trains. Its gradients are reduced once, on the backward of the
  last micro-batch (``sync=True``); earlier micro-batches only accumulate locally.
* ``phase("G", sync)``: G trains and D is frozen: D's parameters do not require grad (no D
  gradients are computed) and D's synchronisation is off (none are reduced), while the
  gradient still flows through D into G.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from gan_dist.distributed import DistInfo
from gan_dist.matmul_conv import use_matmul_convs
from gan_dist.optim import OptimizerFactory

NAMES = ("G", "D")
MODELS_FILE = "models.pt"  # inside a checkpoint directory: replicated strategies' state
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast for the forward passes and one loss scaler per model (fp16 only)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = precision
        self.device = device
        self.dtype = DTYPES[precision]
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("train.precision=bf16 but this GPU has no bf16 support: use fp16 or fp32")
        self.scalers = {n: torch.amp.GradScaler(device.type, enabled=precision == "fp16") for n in NAMES}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def skips_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt.step()` honours an `opt.found_inf` tensor (torch's fused optimizers): it then
    skips the update on the device, with no host sync."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False)) and bool(opt.defaults.get("fused"))


def matmul_convs_wanted(train_cfg: Any, device: torch.device) -> bool:
    """train.matmul_conv: `always`, `never`, or `auto`: on a CPU in eager mode, where oneDNN's
    direct kernels are slow on small grids (cuDNN is not, and inductor picks its own kernels)."""
    if train_cfg.matmul_conv == "auto":
        return device.type == "cpu" and not train_cfg.compile
    return train_cfg.matmul_conv == "always"


def channels_last_activations(module: nn.Module) -> None:
    """Run the 2-D convolutions of `module` on channels_last (NHWC) activations.

    Each convolution's input is made NHWC; oneDNN and cuDNN then choose their NHWC kernels and
    the outputs stay NHWC through normalisation and activations, and so do the weight
    gradients. The parameters keep their layout here: FSDP2 and ZeRO shard and flatten
    contiguous parameters only. DDP, whose gradient buckets take the parameters' strides,
    stores the convolution weights NHWC itself (`parallel.ddp.channels_last_weights`).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_pre_hook(_channels_last_input)


def _channels_last_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` stop requiring grad for the duration (no grads are computed)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Strategy:
    """No distribution: one process. Subclasses override the wrap and sync hooks."""

    name = "none"

    def __init__(self, info: DistInfo, train_cfg: Any, parallel_cfg: Any) -> None:
        self.info = info
        self.device = info.device
        self.train_cfg = train_cfg
        self.parallel_cfg = parallel_cfg
        self.precision = Precision(train_cfg.precision, info.device)
        self.raw: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # updates refused by the non-finite guard, counted on the device (read at logging)
        self.skipped = {n: torch.zeros((), device=self.device) for n in NAMES}
        self._loss_nonfinite: dict[str, torch.Tensor] = {}

    # ---- building -------------------------------------------------------------------------
    def setup(self, G: nn.Module, D: nn.Module, make_optimizer: OptimizerFactory,
              shard_units: Optional[Callable[[nn.Module], list[nn.Module]]] = None,
              checkpoint_units: Optional[Callable[[nn.Module], list[nn.Module]]] = None) -> None:
        """Move to the device, wrap, and build the optimizers with `make_optimizer(name, params)`
        (after wrapping: FSDP shards). `shard_units` (the model spec's) names the sub-modules
        that a sharding strategy may gather one at a time; `checkpoint_units` those that
        train.activation_checkpointing recomputes (default: the shard units)."""
        self.set_units(shard_units, checkpoint_units)
        for name, module in (("G", G), ("D", D)):
            module = self.prepare_module(module, name)
            self.raw[name] = module
            self.wrapped[name] = self.wrap(module, name)
            self.optimizers[name] = self.build_optimizer(make_optimizer, name)

    def set_units(self, shard_units: Optional[Callable[[nn.Module], list[nn.Module]]],
                  checkpoint_units: Optional[Callable[[nn.Module], list[nn.Module]]] = None) -> None:
        self.shard_units = shard_units or (lambda module: [])
        self.checkpoint_units = checkpoint_units or self.shard_units

    def build_optimizer(self, make_optimizer: OptimizerFactory, name: str) -> torch.optim.Optimizer:
        return make_optimizer(name, list(self.wrapped[name].parameters()))

    def prepare_module(self, module: nn.Module, name: str) -> nn.Module:
        """On the device, with the speed settings of train.channels_last, train.matmul_conv and
        train.compile, and the memory setting of train.activation_checkpointing (before any
        wrapping: FSDP2 and ZeRO-3 gather around the checkpointed units)."""
        from gan_dist.parallel.checkpointing import apply_activation_checkpointing, checkpointed_models

        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once
        module = module.to(self.device)
        if matmul_convs_wanted(self.train_cfg, self.device):
            use_matmul_convs(module)
        if self.train_cfg.channels_last:
            channels_last_activations(module)
        if name in checkpointed_models(self.train_cfg.activation_checkpointing):
            apply_activation_checkpointing(self.checkpoint_units(module))
        if self.train_cfg.compile:
            self.compile_module(module, name)
        return module

    def compile_module(self, module: nn.Module, name: str) -> None:
        """torch.compile of the forward, in place: the module stays the same object, so its
        parameters, state_dict keys and the wrappers around it are those of the eager model."""
        module.compile()

    def wrap(self, module: nn.Module, name: str) -> nn.Module:
        return module

    @property
    def G(self) -> nn.Module:
        return self.wrapped["G"]

    @property
    def D(self) -> nn.Module:
        return self.wrapped["D"]

    # ---- phases ---------------------------------------------------------------------------
    def no_sync(self, name: str) -> contextlib.AbstractContextManager:
        """Gradients of `name` computed inside are not reduced across ranks."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def phase(self, trained: str, sync: bool = True, double_backward: bool = False) -> Iterator[None]:
        """`trained` trains; the other model is frozen. `double_backward`: the phase takes input
        gradients of D with create_graph=True (a penalty), see `input_grad`."""
        other = "D" if trained == "G" else "G"
        with contextlib.ExitStack() as stack:
            if not sync:
                stack.enter_context(self.no_sync(trained))
            if trained == "G":
                stack.enter_context(frozen(self.raw[other]))
                stack.enter_context(self.no_sync(other))
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast()

    def input_grad(self, output: torch.Tensor, inputs: torch.Tensor, trained: str) -> torch.Tensor:
        """d output / d inputs with its graph kept, for a penalty whose backward follows in the same
        phase (entered with double_backward=True). Owns the loss scaling: under fp16 the inner
        backward runs on `trained`'s scaled output (small gradients would flush to zero in fp16)
        and the result is unscaled, so the penalty sees the true gradient. No gradient reaches
        the parameters here and nothing is reduced: that happens in the phase's one backward."""
        scaler = self.precision.scalers[trained]
        if not scaler.is_enabled():
            (grad,) = torch.autograd.grad(output, inputs, create_graph=True)
            return grad
        # the scale as the scaler's own device tensor: get_scale() would read it on the host
        scaled = scaler.scale(output)
        (grad,) = torch.autograd.grad(scaled, inputs, create_graph=True)
        return grad / scaler._scale.to(grad.dtype)

    # ---- updates --------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, trained: str) -> None:
        self.note_loss(loss, trained)
        self.precision.scalers[trained].scale(loss).backward()

    def note_loss(self, loss: torch.Tensor, trained: str) -> None:
        """Remember on the device (no host sync) whether this update has seen a non-finite loss."""
        bad = ~torch.isfinite(loss.detach()).all()
        seen = self._loss_nonfinite.get(trained)
        self._loss_nonfinite[trained] = bad if seen is None else seen | bad

    def nonfinite_flag(self, trained: str) -> torch.Tensor:
        """Collective: 1.0 if a loss or gradient of this update is NaN/Inf on any rank, else 0.0.

        A 0-dim float tensor on the device, equal on every rank, computed without a host sync:
        one 2-norm over the gradients (foreach kernels; a max-norm is ~20x slower on CPU) and one
        1-element all-reduce. Ranks must agree: with sharded gradients a NaN may sit in one rank's
        shard only, and a rank that stepped while another skipped would leave the replicas apart.
        A gradient so large that its norm overflows (~1e19 per entry in fp32) counts too.
        """
        flag = torch.zeros((), dtype=torch.float32, device=self.device)
        grads = self.grads(trained)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            flag = (~torch.isfinite(norm)).float().to(self.device)
        loss_bad = self._loss_nonfinite.pop(trained, None)
        if loss_bad is not None:
            flag = torch.maximum(flag, loss_bad.float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def update_is_finite(self, trained: str) -> bool:
        """`nonfinite_flag` read on the host (a sync), for updates that cannot skip on the device."""
        return self.nonfinite_flag(trained).item() == 0.0

    @property
    def skipped_updates(self) -> dict[str, int]:
        """Updates refused so far, per model (reads the device counters: a host sync)."""
        return {n: int(c.item()) for n, c in self.skipped.items()}

    def set_skipped_updates(self, counts: dict[str, int]) -> None:
        for n, c in counts.items():
            self.skipped[n].fill_(c)

    def unscale_(self, trained: str) -> None:
        """Bring gradients to their true scale (fp16) before inspecting them."""
        scaler = self.precision.scalers[trained]
        if scaler.is_enabled():
            scaler.unscale_(self.optimizers[trained])

    def step(self, trained: str) -> None:
        """Update `trained` unless a loss or gradient is NaN/Inf on any rank (then every rank skips).

        The decision stays on the device: fused Adam reads the agreed flag as its `found_inf`
        input and leaves parameters, moments and step count alone when it is set; under fp16 the
        loss scaler's own overflow record is replaced by the agreed flag, so every rank skips and
        backs off alike. Only an optimizer without a found-inf input makes the host decide.
        """
        scaler = self.precision.scalers[trained]
        opt = self.optimizers[trained]
        self.unscale_(trained)
        bad = self.nonfinite_flag(trained)
        self.skipped[trained] += bad
        if scaler.is_enabled():
            for found_inf in scaler._found_inf_per_device(opt).values():
                found_inf.copy_(bad)
            scaler.step(opt)
            scaler.update()
        elif skips_on_device(opt):
            opt.found_inf = bad
            try:
                opt.step()
            finally:
                del opt.found_inf
        elif bad.item() == 0.0:
            opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- shard access (EMA) ---------------------------------------------------------------
    def local_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """The storage of parameter `p` that this rank owns, as a plain tensor aliasing it
        (call under no_grad): the whole tensor here, a shard or partition where sharded."""
        return p

    def local_slice(self, full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The part of a full (unsharded) tensor that this rank's `p` holds. No communication."""
        return full

    def shards_written(self, name: str) -> contextlib.AbstractContextManager:
        """Around writes into `name`'s local tensors: no gathered copy of the old values may
        outlive them. Collective where gathering is."""
        return contextlib.nullcontext()

    def grads(self, trained: str) -> list[torch.Tensor]:
        """This rank's gradient tensors of `trained` (local shards for sharded strategies)."""
        return [p.grad for p in self.raw[trained].parameters() if p.grad is not None]

    # ---- state ----------------------------------------------------------------------------
    def sync_buffers(self) -> None:
        """Make buffers (BatchNorm statistics) equal on every rank before saving. Collective."""

    def full_state_dict(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        """The whole model's state_dict on CPU, on rank 0 (None elsewhere). Collective."""
        if not self.info.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.raw[name].state_dict().items()}

    def sample_module(self, name: str = "G") -> nn.Module:
        """A module that this rank alone may call (no collectives in its forward)."""
        return self.raw[name]

    def save_checkpoint(self, path: Path) -> None:
        """Collective. Write G, D, their optimizers and loss scalers into the directory `path`.

        Replicated strategies (none, DDP): rank 0 writes `models.pt`; every replica is equal.
        """
        from gan_dist.checkpoint import save_file

        if self.info.is_main:
            save_file({"models": {n: self.raw[n].state_dict() for n in NAMES},
                       "optimizers": {n: self.optimizers[n].state_dict() for n in NAMES},
                       "scalers": {n: self.precision.scalers[n].state_dict() for n in NAMES}},
                      Path(path) / MODELS_FILE)

    def load_checkpoint(self, path: Path) -> None:
        """Collective. Restore what `save_checkpoint` wrote; every rank reads `models.pt`."""
        from gan_dist.checkpoint import load_file, load_model_state

        file = Path(path) / MODELS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {MODELS_FILE}: was it written by another parallel.strategy?")
        state = load_file(file, map_location=self.device)
        for n in NAMES:
            load_model_state(self.raw[n], state["models"][n], f"{n} ({file})")
            self.optimizers[n].load_state_dict(state["optimizers"][n])
            if state["scalers"].get(n):  # empty when saved without fp16 loss scaling
                self.precision.scalers[n].load_state_dict(state["scalers"][n])

    def close(self) -> None:
        self.wrapped.clear()
        self.optimizers.clear()
        self.raw.clear()


def broadcast_buffers(modules: list[nn.Module], src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm statistics) on every rank. Collective.

    Data-parallel strategies reduce gradients, never buffers: ranks' running statistics drift
    apart, so they are made equal before anything is saved or sampled for the record.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none exists.

    Sharded strategies (FSDP, DeepSpeed) talk through a process group even with one rank, e.g.
    `python -m gan_dist.train parallel.strategy=fsdp`; an in-memory store needs no port.
    `gan_dist.distributed.teardown()` destroys it like any other group.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if backend == "nccl" else None)
