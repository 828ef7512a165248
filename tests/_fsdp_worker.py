"""Four multi-objective DPO steps (mgda-decoupled, SGD, full fine-tuning) on the tiny policy, in one process or
sharded with torch's FSDP2 (``fully_shard``, every decoder layer and the root) over gloo on two CPU processes,
through the trainer's own step functions: ``take_local_grads`` (each objective's gradient reduce-scattered into
the shards), ``write_combined_gradient`` (the Gram matrix of the shards all-reduced, the combination written
into each process's shards). accelerate routes several CPU processes to DDP, never FSDP, so the trainer's FSDP
wiring is exercised here through these functions; ``tests/training/test_multiprocess.py`` compares the two runs.

    python tests/_fsdp_worker.py one POLICY_DIR PAIRS_DIR OUT.pt
    torchrun --nproc_per_node 2 tests/_fsdp_worker.py fsdp POLICY_DIR PAIRS_DIR OUT.pt
"""

from __future__ import annotations

import copy
import sys

import torch

from moalign.data.pairs import load_pairs
from moalign.training.combiners import combiner_from_settings
from moalign.training.dpo import dpo_loss, write_combined_gradient
from moalign.training.logps import pad_id, sequence_logps
from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair
from moalign.training.sharding import take_local_grads

OBJECTIVES = ("helpful", "harmless")
STEPS, GLOBAL_BATCH, BETA, LR = 4, 4, 0.1, 0.1


def main(mode: str, policy_dir: str, pairs_dir: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    sharded = mode == "fsdp"
    rank, world = 0, 1
    if sharded:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    combiner = combiner_from_settings("mgda-decoupled", {"weights": None, "eta": 0.01, "seed": 0, "reduction": "sum"})
    toks = {n: [tokenize_pair(tok, p, 48, 32) for p in load_pairs(f"{pairs_dir}/{n}.jsonl")] for n in OBJECTIVES}
    coll = MultiObjectiveCollator(MultiObjectiveDataset(toks), pad_id(tok))
    per = GLOBAL_BATCH // world
    rows = []
    for step in range(STEPS):
        acc, losses = [], torch.zeros(len(OBJECTIVES), dtype=torch.float64)
        for k, name in enumerate(OBJECTIVES):
            start = (step * GLOBAL_BATCH) % len(toks[name]) + rank * per
            batch = coll.batch_for(toks[name][start : start + per])
            args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            with torch.no_grad():
                ref_lp = sequence_logps(ref, *args)
            loss = dpo_loss(sequence_logps(model, *args), ref_lp, BETA)[0]
            acc.append(take_local_grads(loss, params) if sharded else
                       list(torch.autograd.grad(loss, params, allow_unused=True)))  # fmt: skip
            losses[k] = float(loss.detach())
        if sharded:
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            losses /= world
        stats = write_combined_gradient(acc, losses, params, combiner, sharded=sharded)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({key: [float(v) for v in stats[key]] for key in ("alpha", "losses", "grad_norms")})
    state = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective under FSDP: every rank calls it
        state[name] = full.detach().clone()
    if rank == 0:
        torch.save({"rows": rows, "params": state, "world": world,
                    "sharded": [type(p).__name__ for p in params]}, out)  # fmt: skip
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
