"""torchrun keeps one store for the whole job across --max-restarts; a restarted process group
must not read the keys of the attempt that died (gan_dist.distributed.agree_on_attempt)."""
from __future__ import annotations

import datetime
import threading

import pytest
import torch.distributed as dist

from gan_dist import distributed as gdist
from tests._mp import PYTHON, REPO, base_env, free_port, run

TIMEOUT = datetime.timedelta(seconds=30)


def agree(port: int, world: int, delays: dict[int, float]) -> list[str]:
    out: list = [None] * world

    def one(r: int) -> None:
        threading.Event().wait(delays.get(r, 0.0))
        client = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=TIMEOUT)
        try:
            out[r] = gdist.agree_on_attempt(client, r, world, TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            out[r] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("late", [None, 0, 1, 2])
def test_every_attempt_agrees_on_a_new_prefix_despite_stale_keys(late):
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    seen = set()
    for _ in range(3):  # three attempts on one store, like torchrun's restarts
        ids = agree(port, 3, {} if late is None else {late: 0.3})
        assert all(isinstance(i, str) for i in ids), ids
        assert len(set(ids)) == 1 and ids[0] not in seen, (ids, seen)
        seen.add(ids[0])
    del server


def test_not_under_torchrun_no_agent_store():
    assert not gdist.uses_agent_store({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert not gdist.uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "False", "MASTER_ADDR": "a",
                                       "MASTER_PORT": "1"})
    assert gdist.uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "a",
                                   "MASTER_PORT": "1"})


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_torchrun_restart_joins_a_fresh_group_when_one_rank_is_late(rdzv):
    """Without the per-attempt prefix the restarted rank 0 connects to the dead rank 1's old gloo
    address and fails or hangs until the group timeout (deterministic with SLOW=1)."""
    port = free_port()
    rdzv_args = (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]
                 if rdzv == "c10d" else ["--master-addr", "127.0.0.1", "--master-port", str(port)])
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "2", *rdzv_args,
           str(REPO / "tests" / "workers" / "elastic_restart.py")]
    r = run(cmd, timeout=240, cwd=REPO, env=base_env(FAILS="2", SLOW="1", PG_TIMEOUT="30"), check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for attempt in range(3):
        for rank in range(2):
            assert f"attempt {attempt} rank {rank}: group up" in out, out[-6000:]
