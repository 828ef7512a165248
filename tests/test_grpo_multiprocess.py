"""Non-linear GRPO on two processes (gloo, CPU): groups split across processes get the transform of the whole
group, the same a single process computes from the same global batch.

``accelerate launch --multi_gpu --num_processes 2`` (accelerate's torch.distributed launcher; without a GPU the
processes use the CPU and gloo) runs ``tests/_grpo_worker.py``: 3 prompts x 4 completions per step, 6 per
process, so the middle prompt's group is split 2 + 2 between the processes. Each process records its local
completions, the rewards TRL gathered, and what IAMATrainer handed back; the test recomputes, in this one
process, the objectives on every completion and the transform of the whole batch. Completions differ from
a one-process run (each process samples its own), so "the same global batch" is the gathered batch itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is needed",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_transform_whole_groups_after_the_gather(tiny_policy_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _grpo_worker import short, vowels

    from moalign.training.nonlinear import nonlinear_rewards

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi", "Name a color", "Count to 3"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "_grpo_worker.py"),
           str(tmp_path / "out"), str(tiny_policy_dir), str(prompts)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    d = [json.loads((tmp_path / "out" / f"rewards-rank{r}.json").read_text())[0] for r in (0, 1)]
    assert d[0]["processes"] == d[1]["processes"] == 2
    # every process gathered the same global batch and returned the same transformed rewards
    assert d[0]["gathered"] == d[1]["gathered"] and d[0]["returned"] == d[1]["returned"]
    gathered = torch.tensor(d[0]["gathered"], dtype=torch.float64)
    assert gathered.shape == (12, 2)
    # the gathered rows are the objectives of each process's own completions, rank 0 first
    texts = d[0]["completions"] + d[1]["completions"]
    expect = torch.tensor([short(None, texts), vowels(None, texts)], dtype=torch.float64).T
    torch.testing.assert_close(gathered, expect, atol=1e-6, rtol=0)
    # the middle prompt's group of 4 is split 2 + 2 between the processes
    ps = d[0]["prompts"] + d[1]["prompts"]
    assert len(set(ps[4:8])) == 1 and ps[4] != ps[3] and ps[7] != ps[8]
    assert ps[4:6] == d[0]["prompts"][4:6] and ps[6:8] == d[1]["prompts"][:2]
    # one process, the same global batch: the transform of whole groups
    ref = nonlinear_rewards(expect.view(3, 4, 2), ["short:bon:4", "vowels:bon:2"], "min")
    returned = torch.tensor(d[0]["returned"], dtype=torch.float64)
    torch.testing.assert_close(returned.sum(1), ref.rewards.reshape(-1), atol=1e-5, rtol=0)
