"""Sequence log-probabilities under a policy and its reference, shared by the trainers.

``sequence_logps`` is the one place a completion's log-probability is summed from logits (multi-objective DPO's
loss and its held-out margins, reference precomputation, distillation's check of what it learnt); the reference
is a separate model, the LoRA base with the adapter disabled, or log-probs computed once before training.
TRL's GRPO trainer computes its own per-token log-probs (IAMA only transforms the rewards it sees).
"""

from __future__ import annotations

import torch

from moalign.errors import MoalignError


def sequence_logps(model, input_ids, attention_mask, completion_mask):
    """``sum_t log pi(x_t | x_<t)`` over completion tokens, one value per row (float32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    logits = logits.float()
    tok = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (tok * mask.float()).sum(-1)


def reference_logps(model, batch, ref_model=None):
    """Reference log-probs of a sub-batch: precomputed, a separate model, or the LoRA base (adapter off)."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(
                ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return sequence_logps(
                    model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                )
    raise MoalignError(
        "no reference: give ref_model, a LoRA (peft) policy, or precomputed reference log-probs"
    )


def implicit_reward_margins(
    model,
    tokenizer,
    pairs,
    beta: float,
    *,
    ref_model=None,
    max_length: int = 256,
    max_prompt_length: int = 128,
    batch_size: int = 4,
    ref_logps=None,
):
    """DPO implicit reward margins ``beta * [(log pi - log ref)(y_w) - (log pi - log ref)(y_l)]`` per pair.

    Accuracy = share of margins > 0 (ties count one half). ``ref_model=None`` needs a peft model (the
    reference is the adapter-disabled base). ``ref_logps``: precomputed ``[n, 2]`` reference log-probs
    (chosen, rejected), e.g. :func:`policy_logps` of the starting policy, shared by several evaluations.
    """
    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair

    toks = [tokenize_pair(tokenizer, p, max_length, max_prompt_length) for p in pairs]
    coll = MultiObjectiveCollator(MultiObjectiveDataset({"x": toks}), pad_id(tokenizer))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(toks), batch_size):
            batch = {k: v.to(dev) for k, v in coll.batch_for(toks[i : i + batch_size]).items()}
            if ref_logps is not None:
                r = torch.as_tensor(ref_logps, dtype=torch.float32)[i : i + batch_size]
                batch["ref_logps"] = torch.cat([r[:, 0], r[:, 1]]).to(dev)
            pol = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref = reference_logps(model, batch, ref_model)
            n = pol.shape[0] // 2
            ratio = (pol - ref).double()
            out.append(beta * (ratio[:n] - ratio[n:]))
    model.train(was_training)
    return torch.cat(out).cpu()


def policy_logps(
    model, tokenizer, pairs, *, max_length: int = 256, max_prompt_length: int = 128, batch_size: int = 4
):
    """``[n, 2]`` log-probs (chosen, rejected) of ``pairs`` under ``model`` (no grad)."""
    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair

    toks = [tokenize_pair(tokenizer, p, max_length, max_prompt_length) for p in pairs]
    coll = MultiObjectiveCollator(MultiObjectiveDataset({"x": toks}), pad_id(tokenizer))
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(toks), batch_size):
            b = {k: v.to(dev) for k, v in coll.batch_for(toks[i : i + batch_size]).items()}
            lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"]).cpu()
            n = lp.shape[0] // 2
            out.append(torch.stack([lp[:n], lp[n:]], dim=1))
    return torch.cat(out)


def pad_id(tokenizer) -> int:
    """The padding id, or the end-of-sequence id for tokenizers without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def precompute_reference(model, ref_model, toks, pad_id: int, batch_size: int = 4) -> None:
    """Fill ``TokenizedPair.ref`` with reference log-probs (chosen, rejected) for every training pair."""
    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset

    coll = MultiObjectiveCollator(MultiObjectiveDataset(toks), pad_id)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    for pairs in toks.values():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            batch = {k: v.to(dev) for k, v in coll.batch_for(chunk).items() if k != "ref_logps"}
            with torch.no_grad():
                if ref_model is not None:
                    ref = sequence_logps(
                        ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                    )
                elif hasattr(model, "disable_adapter"):
                    with model.disable_adapter():
                        ref = sequence_logps(
                            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                        )
                else:  # full fine-tuning, before any step: the policy is the reference
                    ref = sequence_logps(
                        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                    )
            n = len(chunk)
            for j, p in enumerate(chunk):
                p.ref = (float(ref[j]), float(ref[n + j]))
    model.train(was)
