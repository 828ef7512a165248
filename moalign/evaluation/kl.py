"""How far a policy moved from its reference: a Monte Carlo estimate of ``KL(pi || pi_ref)`` on prompts.

``KL(pi || pi_ref) = E_{y ~ pi}[log pi(y | x) - log pi_ref(y | x)]`` over whole responses, so the mean of the
sequence log-ratio of responses *sampled from pi* (plain sampling: temperature 1, no top-k or top-p, as GRPO
samples) is an unbiased estimate of it, per prompt; a response is its tokens up to and including the first
end-of-turn token, or the first ``max_new_tokens`` tokens (then it is the KL between the two distributions of
``max_new_tokens``-token prefixes). Reported in nats per response, with the per-prompt values for paired
intervals. Trainers log a per-token KL on their own training batches; this measures every policy, trained with a
KL term or not, on the same held-out prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moalign.errors import MoalignError


def sequence_log_ratios(model, ref_model, prompt_ids: Sequence[Sequence[int]],
                        completion_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> np.ndarray:
    """``log pi(y | x) - log pi_ref(y | x)`` summed over each completion's tokens, one value per row (float64).

    Rows are right-padded, so every token keeps its position and sees exactly its own prefix."""
    if len(prompt_ids) != len(completion_ids):
        raise MoalignError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    return (completion_logps(model, prompt_ids, completion_ids, pad_id, batch_size)
            - completion_logps(ref_model, prompt_ids, completion_ids, pad_id, batch_size))


def sample_completions(model, prompt_ids: Sequence[Sequence[int]], n: int, max_new_tokens: int,
                       eos_ids: Sequence[int], pad_id: int, seed: int = 0, batch_prompts: int = 8,
                       return_logps: bool = False):
    """``n`` plain samples (temperature 1, no top-k/top-p) per prompt, each cut after its first end token.

    ``batch_prompts`` prompts (``n`` rows each) are decoded together, left-padded (generate derives the
    positions from the attention mask, so every row samples from its own prompt's distribution). With
    ``return_logps`` also each sample's log-probability under ``model``, summed from the very logits it was
    sampled from (no second forward pass): ``(samples, logps)``, both ``[prompt][sample]``."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           eos_token_id=list(eos_ids) or None, pad_token_id=pad_id, return_dict_in_generate=True,
                           output_logits=return_logps)  # fmt: skip
    dev = next(model.parameters()).device
    ends = set(int(e) for e in eos_ids)
    torch.manual_seed(seed)
    out, out_lp = [], []
    for i in range(0, len(prompt_ids), batch_prompts):
        chunk = [list(p) for p in prompt_ids[i : i + batch_prompts] for _ in range(n)]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], dtype=torch.long, device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long, device=dev)
        with torch.no_grad():
            res = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        new = res.sequences[:, width:]
        rows, cuts = [], []
        for s in new.tolist():
            cut = next((k + 1 for k, t in enumerate(s) if t in ends), len(s))
            rows.append(s[:cut])
            cuts.append(cut)
        out += [rows[j : j + n] for j in range(0, len(rows), n)]
        if return_logps:
            logits = torch.stack(res.logits, 1).double()  # [rows, steps, vocab], the raw (unprocessed) logits
            tok = torch.gather(torch.log_softmax(logits, -1), 2, new[:, : logits.shape[1]].unsqueeze(-1)).squeeze(-1)
            keep = torch.arange(tok.shape[1], device=tok.device)[None, :] < torch.tensor(cuts, device=tok.device)[:, None]
            lp = (tok * keep).sum(1).cpu().tolist()
            out_lp += [lp[j : j + n] for j in range(0, len(lp), n)]
    return (out, out_lp) if return_logps else out


def completion_logps(model, prompt_ids, completion_ids, pad_id: int, batch_size: int = 8) -> np.ndarray:
    """``log pi(y | x)`` of each completion under ``model``, in right-padded batches (float64)."""
    from moalign.training.logps import sequence_logps

    out = []
    dev = next(model.parameters()).device
    for i in range(0, len(prompt_ids), batch_size):
        ids, attn, comp = _right_padded(prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size], pad_id)
        with torch.no_grad():
            out.append(sequence_logps(model, ids.to(dev), attn.to(dev), comp.to(dev)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _right_padded(prompts, completions, pad_id: int):
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for j, (r, p) in enumerate(zip(rows, prompts)):
        ids[j, : len(r)] = torch.tensor(r)
        attn[j, : len(r)] = 1
        comp[j, len(p) : len(r)] = 1
    return ids, attn, comp


def sampled_kl(policy, reference, prompts, n: int = 4, max_new_tokens: int = 32, seed: int = 0,
               batch_size: int = 8, system_prompt: str | None = None) -> dict:
    """``KL(policy || reference)`` per prompt, estimated from ``n`` samples of ``policy`` per prompt.

    ``policy``/``reference``: :class:`moalign.policies.Policy` sharing a tokenizer (checked on the prompts);
    ``prompts``: :class:`moalign.data.prompts.Prompt` objects. Returns ``{"per_prompt": [...], "mean": ...,
    "log_ratios": [[...], ...], "tokens": mean tokens per sample}`` (nats per response)."""
    from moalign.policies import eos_token_ids, render_chat

    tok = policy.tokenizer
    if not prompts:
        raise MoalignError("sampled_kl needs at least one prompt")
    texts = [render_chat(tok, p.messages, system_prompt) for p in prompts]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ref_ids = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if prompt_ids != ref_ids:
        raise MoalignError("the policy and the reference tokenize the prompts differently: no shared KL")
    eos = eos_token_ids(tok, policy.model)
    samples, logps = sample_completions(policy.model, prompt_ids, n, max_new_tokens, eos, tok.pad_token_id, seed,
                                        return_logps=True)  # fmt: skip
    flat_p = [p for p, rows in zip(prompt_ids, samples) for _ in rows]
    flat_c = [c for rows in samples for c in rows]
    ref = completion_logps(reference.model, flat_p, flat_c, tok.pad_token_id, batch_size)
    per = (np.array(logps, dtype=np.float64).reshape(-1) - ref).reshape(len(prompts), n)
    return {"per_prompt": per.mean(1).tolist(), "mean": float(per.mean()), "log_ratios": per.tolist(),
            "tokens": float(np.mean([len(c) for c in flat_c]))}  # fmt: skip
