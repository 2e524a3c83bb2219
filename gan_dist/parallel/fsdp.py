"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for G and D, each block its own shard unit.

Why torch's FSDP2 and not accelerate's FSDP plugin: on a machine without GPUs the plugin
silently falls back to DDP (version 2) or refuses to start (version 1), while `fully_shard`
runs the same code on gloo/CPU and NCCL/GPU.

Exact syncing, as in DDP: G and D are separate FSDP roots. In the D phase G's output is
detached, so G takes no part in D's backward. In the G phase D's sharded parameters stop
requiring grad before D is gathered (FSDP copies the flag onto the gathered parameters), so
the backward through D computes only the gradient with respect to its input: D's parameters
are all-gathered for the forward and backward, but no gradient of D exists to be reduced or
kept. With gradient accumulation, `set_requires_gradient_sync(False)` keeps the unsharded
gradients local until the last micro-batch, whose backward reduce-scatters them once.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from gan_dist.config import ConfigError
from gan_dist.parallel.base import DTYPES, NAMES, Strategy, broadcast_buffers, ensure_process_group

CHECKPOINT_DIR = "fsdp"  # DCP directory inside a checkpoint
SCALERS_FILE = "fsdp_scalers.pt"


def _is_norm_with_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase)


class FSDPStrategy(Strategy):
    """G and D sharded across ranks; parameters gathered one block at a time.

    Mixed precision uses FSDP's policy: blocks compute in `param_dtype` (bf16/fp16) while the
    sharded parameters, optimizer state and the gradient reduction (`reduce_dtype`) stay in
    fp32. BatchNorm layers are their own units with an fp32 policy: a bf16 BatchNorm fails
    against its fp32 running statistics, and fp32 statistics are what GANs want anyway.
    """

    name = "fsdp"

    def __init__(self, info, train_cfg, parallel_cfg) -> None:
        super().__init__(info, train_cfg, parallel_cfg)
        from torch.distributed.device_mesh import init_device_mesh

        cfg = parallel_cfg.fsdp
        self.param_dtype = DTYPES[cfg.param_dtype or train_cfg.precision]
        self.reduce_dtype = DTYPES[cfg.reduce_dtype]
        if self.param_dtype == torch.float16 and train_cfg.precision != "fp16":
            raise ConfigError("parallel.fsdp.param_dtype=fp16 needs loss scaling: set train.precision=fp16 "
                              "(or use param_dtype=bf16)")
        if cfg.cpu_offload and train_cfg.compile:
            raise ConfigError("parallel.fsdp.cpu_offload=true cannot be combined with train.compile=true")
        # D returns `logits.flatten()`, a view; the loop never modifies a model output in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        ensure_process_group(self.device)
        self.mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        if train_cfg.precision == "fp16":
            # found-inf must be agreed by all ranks, or one rank skips a step the others take
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.precision.scalers = {n: ShardedGradScaler(self.device.type) for n in NAMES}

    # ---- building -------------------------------------------------------------------------
    def wrap(self, module: nn.Module, name: str) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        cfg = self.parallel_cfg.fsdp
        offload = (CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if cfg.cpu_offload
                   else OffloadPolicy())
        common = dict(mesh=self.mesh, reshard_after_forward=cfg.reshard_after_forward, offload_policy=offload)
        low_precision = self.param_dtype != torch.float32
        block_policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        fp32_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in self.shard_units(module):
            if low_precision:
                for sub in block.modules():
                    if _is_norm_with_stats(sub):
                        fully_shard(sub, mp_policy=fp32_policy, **common)
            fully_shard(block, mp_policy=block_policy, **common)
        # the root returns fp32, so losses and sample images are computed in full precision
        root_policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                                           output_dtype=torch.float32)
        fully_shard(module, mp_policy=root_policy, **common)
        return module

    def build_optimizer(self, make_optimizer, name: str) -> torch.optim.Optimizer:
        # ShardedGradScaler hands fused Adam a found-inf tensor of shape [1], which it rejects
        fused_ok = self.train_cfg.precision != "fp16"
        return make_optimizer(name, list(self.wrapped[name].parameters()), fused_ok=fused_ok)

    def _fsdp_modules(self, name: str) -> list[nn.Module]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.raw[name].modules() if isinstance(m, FSDPModule)]

    # ---- phases ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, name: str) -> Iterator[None]:
        root = self.wrapped[name]
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def phase(self, trained: str, sync: bool = True, double_backward: bool = False) -> Iterator[None]:
        if trained == "G":
            # A forward without backward (sampling, or reshard_after_forward=False) can leave D
            # gathered; its gathered parameters would keep requires_grad=True. Reshard first,
            # so that freezing acts on the sharded parameters FSDP copies the flag from.
            for m in self._fsdp_modules("D"):
                m.reshard()
        if not double_backward:
            with super().phase(trained, sync):
                yield
            return
        # A penalty's outer backward runs through the inner backward's graph, which holds the
        # gathered parameters FSDP would free after each block's forward and backward
        # (pytorch/pytorch#172543). They stay gathered, for this model only, until the phase's
        # one backward is done; the reduce-scatter is the usual one, at the end of it.
        units = self._fsdp_modules(trained)
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        try:
            with super().phase(trained, sync):
                yield
        finally:
            root = self.raw[trained]
            for m in units:  # the root never reshards after forward (FSDP2's default for it)
                m.set_reshard_after_forward(m is not root and self.parallel_cfg.fsdp.reshard_after_forward,
                                            recurse=False)
                m.set_reshard_after_backward(True, recurse=False)
                m.reshard()

    # ---- shard access (EMA) ---------------------------------------------------------------
    def local_tensor(self, p: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return p._local_tensor if isinstance(p, DTensor) else p

    def local_slice(self, full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(p, DTensor):
            return full
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()

    @contextlib.contextmanager
    def shards_written(self, name: str) -> Iterator[None]:
        # FSDP2 keeps gathered parameters after a forward without backward (reshard_after_forward
        # off, or the root module): drop them, so the next forward gathers the new shards
        for m in self._fsdp_modules(name):
            m.reshard()
        yield

    def grads(self, trained: str) -> list[torch.Tensor]:
        local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self.raw[trained].parameters() if p.grad is not None]
        return [g for g in local if g.numel() > 0]  # a small parameter may leave a rank no rows

    # ---- state ----------------------------------------------------------------------------
    def sync_buffers(self) -> None:
        broadcast_buffers(list(self.raw.values()))

    def full_state_dict(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.raw[name],
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def sample_module(self, name: str = "G") -> nn.Module:
        # the FSDP root: its forward gathers each block, so every rank must call it
        return self.wrapped[name]

    def _train_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {n: {"model": get_model_state_dict(self.raw[n]),
                    "optim": get_optimizer_state_dict(self.raw[n], self.optimizers[n])} for n in NAMES}

    def save_checkpoint(self, path: Path) -> None:
        """Each rank writes its shards of G, D and their Adam state (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        # buffers are replicated, and DCP writes a replicated tensor from one rank of its choice:
        # make them rank 0's, as the replicated strategies' checkpoints are
        self.sync_buffers()
        dcp.save(self._train_state(), checkpoint_id=str(path / CHECKPOINT_DIR))
        if self.info.is_main:
            torch.save({n: s.state_dict() for n, s in self.precision.scalers.items()}, path / SCALERS_FILE)
        dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        """Restores what `save_checkpoint` wrote; the world size may differ (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        from gan_dist.checkpoint import load_file
        from gan_dist.parallel.safe_load import safe_dcp_reader

        path = Path(path)
        if not (path / CHECKPOINT_DIR).is_dir():
            raise FileNotFoundError(f"{path} holds no FSDP state ({CHECKPOINT_DIR}/ is missing): "
                                    "was it written by another parallel.strategy?")
        state = self._train_state()
        dcp.load(state, storage_reader=safe_dcp_reader(path / CHECKPOINT_DIR), planner=_SafeLoadPlanner())
        for n in NAMES:
            set_model_state_dict(self.raw[n], state[n]["model"])
            set_optimizer_state_dict(self.raw[n], self.optimizers[n], state[n]["optim"])
        scalers = load_file(path / SCALERS_FILE)  # weights_only, and an error that names the file
        for n, s in self.precision.scalers.items():
            if scalers.get(n):
                s.load_state_dict(scalers[n])

    def close(self) -> None:
        super().close()
        self.mesh = None


def _SafeLoadPlanner():  # noqa: N802  (built lazily: DCP is imported only when checkpointing)
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, but non-tensor entries (optimizer hyper-parameters) are unpickled with
        weights_only=True: a checkpoint directory must not be able to run code."""

        def load_bytes(self, read_item, value) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()
