"""Process group setup from whatever launched us, rank helpers and a clean teardown.

Every launcher describes the job in environment variables: torchrun and `accelerate launch`
set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `srun` running the script
directly sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. We read them ourselves and call
`init_process_group` ourselves, so that N processes are always ONE job of world size N
(`accelerate launch --multi_gpu` on a CPU machine otherwise gives N independent runs).
"""
from __future__ import annotations

import datetime
import gc
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: Optional[str]  # None in a single process without a process group
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "127.0.0.1"


def detect_launcher(env: Optional[dict] = None) -> dict[str, Any]:
    """Rank layout and rendezvous described by the environment (no side effects)."""
    env = dict(os.environ) if env is None else env
    get = lambda k, d=None: int(env[k]) if env.get(k, "") != "" else d  # noqa: E731
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env else (
            "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
        world = get("WORLD_SIZE")
        local_world = get("LOCAL_WORLD_SIZE", world)
        return dict(launcher=launcher, rank=get("RANK"), world_size=world,
                    local_rank=get("LOCAL_RANK", 0), local_world_size=local_world,
                    node_rank=get("GROUP_RANK", get("NODE_RANK", get("RANK") // max(local_world, 1))),
                    master_addr=env.get("MASTER_ADDR"), master_port=env.get("MASTER_PORT"))
    if get("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job = get("SLURM_JOB_ID", 0)
        return dict(launcher="srun", rank=get("SLURM_PROCID"), world_size=get("SLURM_NTASKS"),
                    local_rank=get("SLURM_LOCALID", 0),
                    local_world_size=get("SLURM_NTASKS_PER_NODE", get("SLURM_NTASKS")),
                    node_rank=get("SLURM_NODEID", 0),
                    master_addr=env.get("MASTER_ADDR"),
                    master_port=env.get("MASTER_PORT", str(20000 + job % 20000)))
    single = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env else "python"
    return dict(launcher=single, rank=0, world_size=1, local_rank=0, local_world_size=1,
                node_rank=0, master_addr=None, master_port=None)


def init_distributed(timeout_s: Optional[float] = None) -> DistInfo:
    """Join the job described by the environment. NCCL with CUDA, gloo otherwise."""
    info = detect_launcher()
    if torch.cuda.is_available():
        device = torch.device("cuda", info["local_rank"] % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if info["world_size"] <= 1:
        return DistInfo(0, 1, 0, 1, 0, device, None, info["launcher"])
    if info["launcher"] == "srun":
        os.environ.setdefault("MASTER_ADDR", info["master_addr"] or _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(info["master_port"]))
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise RuntimeError(
            f"WORLD_SIZE={info['world_size']} but MASTER_ADDR/MASTER_PORT are not set: "
            "start the job with torchrun, accelerate launch or launch/slurm.sh")
    if timeout_s is None:
        timeout_s = float(os.environ.get("GAN_DIST_PG_TIMEOUT", 1800))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = None
        if uses_agent_store():
            store = attempt_store(info["rank"], info["world_size"], timeout)
        dist.init_process_group(backend=backend, store=store, rank=info["rank"],
                                world_size=info["world_size"], timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return DistInfo(info["rank"], info["world_size"], info["local_rank"],
                    info["local_world_size"], info["node_rank"], device, backend, info["launcher"])


# ---- a fresh store namespace for every restart under torchrun -------------------------------------
# torchrun (and `accelerate launch`, which runs torch's elastic agent) hosts one TCPStore in the
# agent for the whole job (TORCHELASTIC_USE_AGENT_STORE=True, at MASTER_ADDR:MASTER_PORT) and
# keeps it across restarts (--max-restarts): the static and the c10d rendezvous create it once.
# `init_process_group(init_method="env://")` uses that store without any per-attempt prefix, so
# the restarted workers find the keys the killed attempt wrote: gloo reads the dead peer's
# address and retries it, or waits for a connection that never comes, until the group timeout
# (NCCL reads the old unique id). Whether it happens depends on which rank reaches the store
# first, hence "sometimes". TORCHELASTIC_RESTART_COUNT is no cure: it is counted by each agent,
# and agents that restart for a membership change do not count it.
_AGENT_PREFIX = "gan_dist/pg"


def uses_agent_store(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    return (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and bool(env.get("MASTER_ADDR"))
            and bool(env.get("MASTER_PORT")))


def agree_on_attempt(store: Any, rank_: int, world_size_: int, timeout: datetime.timedelta) -> str:
    """A key prefix that every rank of THIS attempt agrees on and no earlier attempt used.

    Keys left by a killed attempt are still in the agent's store, so nothing read there can be
    trusted to be fresh, except an answer to a question nobody asked before: every rank > 0
    posts a new random token, and only a live rank 0 answers it, with its own new random id.
    (When the workers of an attempt start, the agents have stopped all workers of the earlier
    one.) Rank 0 keeps answering until every rank has confirmed under the new id.
    """
    if rank_ != 0:
        token = uuid.uuid4().hex
        store.set(f"{_AGENT_PREFIX}/hello/{rank_}", token)
        attempt = store.get(f"{_AGENT_PREFIX}/welcome/{token}").decode()  # waits up to `timeout`
        store.add(f"{_AGENT_PREFIX}/{attempt}/joined", 1)
        return attempt
    attempt = uuid.uuid4().hex
    hellos = [f"{_AGENT_PREFIX}/hello/{r}" for r in range(1, world_size_)]
    answered: set[str] = set()
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        # every rank's latest token: this attempt's, or a stale one that nobody waits for
        tokens = {t.decode() for t in store.multi_get(hellos)} - answered
        if tokens:
            store.multi_set([f"{_AGENT_PREFIX}/welcome/{t}" for t in tokens], [attempt] * len(tokens))
            answered |= tokens
        if store.add(f"{_AGENT_PREFIX}/{attempt}/joined", 0) >= world_size_ - 1:
            return attempt
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0: not all {world_size_} ranks joined the process group within "
                               f"{timeout.total_seconds():.0f}s")
        time.sleep(0.01)


def attempt_store(rank_: int, world_size_: int, timeout: datetime.timedelta) -> Any:
    """The launcher agent's store, seen through a prefix that is new for this attempt."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size_,
                          is_master=False, timeout=timeout)
    attempt = agree_on_attempt(store, rank_, world_size_, timeout)
    return dist.PrefixStore(f"{_AGENT_PREFIX}/{attempt}/default_pg", store)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a small picklable object, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def teardown(clean: bool = True) -> None:
    """Leave the process group; callers drop their wrappers and optimizers first.

    gloo aborts at interpreter exit when DDP reducers outlive the process group; collecting
    them, then a barrier before destroy_process_group makes exit clean. After a failure
    (`clean=False`) the other ranks may never reach a barrier, so none is attempted.
    """
    gc.collect()
    if is_distributed():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
