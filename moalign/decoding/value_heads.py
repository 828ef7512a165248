"""CD-FUDGE value heads on the policy's own hidden states, for decoding (``cd``/``rmod --values PATH``; spec: rmod.md).

A value ``V_g(x, y^{<=t})`` estimates the final reward of objective ``g`` when the policy continues the
prefix; what the heads regress and how they are fitted is in :mod:`moalign.training.values`.

Training (sampling, fitting, the held-out report, ``moalign train values``) lives in
:mod:`moalign.training.values`; this module holds what decoding needs: the heads, their features, the on-disk
format (:func:`save_value_heads` / :func:`load_value_heads`) and the compatibility checks.

Decoding with the heads costs one head application per candidate; :class:`HeadValueFunction` obtains the
hidden states either from ``step.last_hidden`` (``[P, K, H]``, if the engine provides them) or by one batched
forward pass of the policy over [chat-templated prompt + candidate tokens].

Train and decode must see the same text: the heads store the chat template (and its hash), the system prompt,
a rendering of a probe conversation and the policy's hidden state on it; :func:`load_value_function` checks
them against the policy it is given and raises :class:`MoalignError` naming any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from moalign.compute import Reads, model_cost
from moalign.data.prompts import Prompt
from moalign.decoding.backend import BlockStep
from moalign.errors import MoalignError
from moalign.objectives.normalize import NormStats
from moalign.policies import Policy, eos_token_ids, render_chat

FORMAT = "moalign-value-heads/1"
WEIGHTS_FILE = "value_heads.safetensors"
META_FILE = "value_heads.json"
HEAD_KINDS = ("linear", "mlp")
PROBE_MESSAGES = ({"role": "user", "content": "Probe: how do value heads see this prompt?"},)
PROBE_RESPONSE = "They see the policy's hidden states."
#: relative L2 difference of the probe hidden state above which the policy is considered a different model
FINGERPRINT_TOL = 0.05


# --------------------------------------------------------------------------------------------------- heads
class ValueHeads(torch.nn.Module):
    """G independent heads ``[..., H] -> [..., G]`` on standardised features ``(h - mu) / sigma``.

    ``linear``: ``V_g = w_g . u + b_g``;  ``mlp``: ``V_g = a_g . gelu(W_g u + c_g) + b_g`` (width M).
    """

    def __init__(self, hidden_size: int, names: Sequence[str], kind: str = "linear", width: int = 64):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise MoalignError(f"unknown head {kind!r}; choose from {', '.join(HEAD_KINDS)}")
        self.names = [str(n) for n in names]
        self.kind, self.width, self.hidden_size = kind, int(width), int(hidden_size)
        G, H = len(self.names), self.hidden_size
        self.register_buffer("feat_mean", torch.zeros(H))
        self.register_buffer("feat_std", torch.ones(H))
        self.bias = torch.nn.Parameter(torch.zeros(G))
        if kind == "linear":
            self.weight = torch.nn.Parameter(torch.zeros(G, H))
        else:
            M = self.width
            self.w1 = torch.nn.Parameter(torch.randn(G, H, M) / math.sqrt(H))
            self.b1 = torch.nn.Parameter(torch.zeros(G, M))
            self.w2 = torch.nn.Parameter(torch.randn(G, M) / math.sqrt(M))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        u = (hidden.to(self.feat_mean.dtype) - self.feat_mean) / self.feat_std
        if self.kind == "linear":
            return u @ self.weight.T + self.bias
        a = torch.nn.functional.gelu(torch.einsum("...h,ghm->...gm", u, self.w1) + self.b1)
        return (a * self.w2).sum(-1) + self.bias

    def spec(self) -> dict:
        return {"kind": self.kind, "width": self.width, "hidden_size": self.hidden_size, "names": self.names}


# --------------------------------------------------------------------------------------------- features
def prompt_token_ids(tokenizer, prompt: Prompt, system_prompt: str | None) -> list[int]:
    """The prompt's tokens exactly as the engine encodes them (chat template, no extra special tokens)."""
    return tokenizer(
        render_chat(tokenizer, prompt.messages, system_prompt), add_special_tokens=False
    ).input_ids


def valid_length(ids: Sequence[int], eos: Sequence[int]) -> int:
    """Response tokens that count: up to and including the first end-of-turn token (pad follows it)."""
    eos = set(eos)
    for i, t in enumerate(ids):
        if t in eos:
            return i + 1
    return len(ids)


@torch.inference_mode()
def response_hidden_states(
    policy: Policy,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    last_only: bool = False,
    batch: int = 16,
) -> list[torch.Tensor]:
    """Last-layer hidden states of the policy over ``prompt + response``, at the response positions.

    Returns, per sequence, ``[L_i, H]`` (row ``t-1``: after response token ``t``) or, with ``last_only``,
    ``[H]`` at the last response token. Sequences are left-padded with position ids counted from the first
    real token (as the engine does), so padding does not change the result.
    """
    model, device = policy.model, policy.device
    pad = policy.tokenizer.pad_token_id or 0
    out: list[torch.Tensor] = []
    n = len(prompt_ids)
    for s in range(0, n, batch):
        seqs = [list(prompt_ids[i]) + list(response_ids[i]) for i in range(s, min(n, s + batch))]
        lens = [len(response_ids[i]) for i in range(s, min(n, s + batch))]
        if min(lens) < 1:
            raise MoalignError("response_hidden_states: every response needs at least one token")
        T = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, T - len(q) :] = torch.tensor(q, dtype=torch.long)
            attn[r, T - len(q) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        res = model(
            input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
            output_hidden_states=True, logits_to_keep=1, use_cache=False,
        )  # fmt: skip
        h = res.hidden_states[-1].float().cpu()
        for r, L in enumerate(lens):
            out.append(h[r, -1].clone() if last_only else h[r, T - L :].clone())
    return out


def _probe(policy: Policy, system_prompt: str | None) -> tuple[str, torch.Tensor]:
    tok = policy.tokenizer
    text = render_chat(tok, PROBE_MESSAGES, system_prompt)
    p_ids = tok(text, add_special_tokens=False).input_ids
    r_ids = tok(PROBE_RESPONSE, add_special_tokens=False).input_ids
    h = response_hidden_states(policy, [p_ids], [r_ids], last_only=True)[0]
    return text, h


def template_sha(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(tpl, str):
        tpl = json.dumps(tpl, sort_keys=True)
    return hashlib.sha256(tpl.encode()).hexdigest()


def _hidden_size(policy: Policy) -> int:
    cfg = policy.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.hidden_size)

# --------------------------------------------------------------------------------------- save / load
def save_value_heads(heads: ValueHeads, meta: dict, out: str | Path, probe_hidden: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
    tensors["probe_hidden"] = probe_hidden.detach().float().contiguous().cpu()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


def load_value_heads(path: str | Path) -> tuple[ValueHeads, dict, torch.Tensor]:
    """Load (heads, metadata, probe hidden state) from a folder written by :func:`train_values`."""
    from safetensors.torch import load_file

    p = Path(path)
    folder = p.parent if p.name in (META_FILE, WEIGHTS_FILE) else p
    if not (folder / META_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise MoalignError(
            f"no value heads at {path}: expected {META_FILE} and {WEIGHTS_FILE} (moalign train values)"
        )
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise MoalignError(f"{folder / META_FILE}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    spec = meta["head"]
    heads = ValueHeads(spec["hidden_size"], spec["names"], spec["kind"], spec["width"])
    tensors = load_file(str(folder / WEIGHTS_FILE))
    probe = tensors.pop("probe_hidden")
    heads.load_state_dict(tensors)
    heads.eval()
    return heads, meta, probe


_UNSET = object()


def check_compatible(meta: dict, probe_hidden: torch.Tensor, policy: Policy, system_prompt=_UNSET) -> None:
    """Raise :class:`MoalignError` naming what differs between training and this policy/template."""
    trained = meta["policy"]
    who = f"trained on policy {trained['name']!r} ({trained['source']})"
    H = _hidden_size(policy)
    if H != trained["hidden_size"]:
        raise MoalignError(
            f"value heads {who} expect hidden size {trained['hidden_size']}, policy {policy.name!r} has {H}"
        )
    tpl = meta["template"]
    if system_prompt is not _UNSET and system_prompt != tpl["system_prompt"]:
        raise MoalignError(
            f"system prompt mismatch: value heads were trained with {tpl['system_prompt']!r}, decoding uses "
            f"{system_prompt!r} (train and decode must use the same prompt text)"
        )
    sha = template_sha(policy.tokenizer)
    if sha != tpl["chat_template_sha256"]:
        raise MoalignError(
            f"chat template mismatch: value heads {who} used template sha256 {tpl['chat_template_sha256'][:12]}, "
            f"policy {policy.name!r} has {sha[:12]}"
        )
    text, h = _probe(policy, tpl["system_prompt"])
    if text != tpl["probe_rendering"]:
        raise MoalignError(
            f"chat template mismatch: policy {policy.name!r} renders the probe conversation differently from "
            f"training ({text!r} vs {tpl['probe_rendering']!r})"
        )
    rel = float((h - probe_hidden).norm() / probe_hidden.norm().clamp(min=1e-12))
    if not rel <= FINGERPRINT_TOL:
        raise MoalignError(
            f"policy mismatch: value heads {who}; policy {policy.name!r} ({policy.source}) gives different "
            f"hidden states (relative difference {rel:.3g} > {FINGERPRINT_TOL})"
        )


class HeadValueFunction:
    """``value_fn(step) -> [P, K, G]`` from value heads; values in the scorer's normalisation (see below).

    The heads predict z-scores under their training statistics ``(m_h, s_h)``; they are mapped back to raw
    units ``r = z s_h + m_h`` and then into the scorer's space (its z-score, or raw if it has none), so that
    values are comparable with rewards everywhere else in a run. Without a scorer the head z-scores are used.
    """

    name = "heads"
    #: decodes pass the rows' last hidden states (``BlockStep.last_hidden``) when the backend has them
    needs_hidden_states = True

    def __init__(self, heads: ValueHeads, meta: dict, policy: Policy, scorer=None, batch_rows: int = 32):
        self.heads, self.meta, self.policy = heads.to(policy.device), meta, policy
        self.system_prompt = meta["template"]["system_prompt"]
        self.eos = eos_token_ids(policy.tokenizer, policy.model)
        self.batch_rows = batch_rows
        self._prompt_cache: dict[str, list[int]] = {}
        norm = NormStats.from_dict(meta["norm"])
        if scorer is None:
            self.names = list(heads.names)
            self._cols = list(range(len(self.names)))
            self._scale = self._shift = None
        else:
            missing = [n for n in scorer.names if n not in heads.names]
            if missing:
                raise MoalignError(
                    f"value heads have no head for objective(s) {missing} (they cover {heads.names})"
                )
            self.names = list(scorer.names)
            self._cols = [heads.names.index(n) for n in self.names]
            m = torch.tensor([norm.mean[c] for c in self._cols], dtype=torch.float64)
            s = torch.tensor([norm.std[c] for c in self._cols], dtype=torch.float64)
            if scorer.norm is not None:  # z_scorer = (z_h s_h + m_h - m_sc) / s_sc
                ms = torch.tensor(scorer.norm.mean, dtype=torch.float64)
                ss = torch.tensor(scorer.norm.std, dtype=torch.float64)
                self._scale, self._shift = s / ss, (m - ms) / ss
            else:
                self._scale, self._shift = s, m

    @torch.no_grad()
    def from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``[..., G]`` from last-token hidden states ``[..., H]``."""
        z = self.heads(hidden.to(self.heads.feat_mean.device)).double().cpu()[..., self._cols]
        if self._scale is not None:
            z = z * self._scale + self._shift
        return z.float()

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        key = json.dumps(list(prompt.messages), sort_keys=True)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = prompt_token_ids(self.policy.tokenizer, prompt, self.system_prompt)
        return self._prompt_cache[key]

    def last_hidden(self, step: BlockStep) -> tuple[torch.Tensor, list[int]]:
        """``[P, K, H]`` hidden states after each candidate's last valid token (one batched forward pass of
        the policy) and the tokens that pass read per group."""
        P, K, _ = step.token_ids.shape
        p_ids, r_ids = [], []
        for p in range(P):
            pid = self._prompt_ids(step.prompts[p])
            for k in range(K):
                row = step.token_ids[p, k].tolist()
                p_ids.append(pid)
                r_ids.append(row[: max(1, valid_length(row, self.eos))])
        h = response_hidden_states(self.policy, p_ids, r_ids, last_only=True, batch=self.batch_rows)
        read = [sum(len(p_ids[i]) + len(r_ids[i]) for i in range(p * K, (p + 1) * K)) for p in range(P)]
        return torch.stack(h).view(P, K, -1), read

    def __call__(self, step: BlockStep) -> torch.Tensor:
        """Values from the decode's hidden states (the heads read no tokens) or, without them, from one
        forward pass of the policy over prompt + candidate (counted as scorer tokens in ``step.cost``)."""
        P, K = step.done.shape
        hidden = getattr(step, "last_hidden", None)
        reads = Reads(P)
        if hidden is None:
            hidden, read = self.last_hidden(step)
            reads.add(model_cost(self.policy.model, self.policy.name), read)
        step.add_cost([K] * P, reads)
        return self.from_hidden(hidden)


def load_value_function(
    path: str | Path, policy: Policy, scorer=None, *, system_prompt=_UNSET, check: bool = True
) -> HeadValueFunction:
    """Load value heads for decoding with ``policy``; checks policy, template and (if given) system prompt.

    ``scorer`` (an :class:`~moalign.decoding.values.ObjectiveScorer`) picks the objectives, their order and
    the normalisation of the returned values.
    """
    heads, meta, probe = load_value_heads(path)
    if check:
        check_compatible(meta, probe, policy, system_prompt)
    return HeadValueFunction(heads, meta, policy, scorer)
