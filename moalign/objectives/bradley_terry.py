"""Bradley-Terry reward models as objectives: a frozen CPU backbone and a small head, loaded from a folder.

Model. A reward ``r(x, y) = h(phi(x, y))`` where ``phi`` is a frozen feature map and ``h`` a small head
(linear, or a one-hidden-layer MLP) on standardised features, fitted on preference pairs under the
Bradley-Terry model (training: :mod:`moalign.training.reward`, ``moalign train reward``).

Feature recipes (the backbone is frozen, so features are computed once and the head trains in seconds):

* ``minilm`` (default, shipped): all-MiniLM-L6-v2 unit embeddings ``p = e(prompt)`` (prompt truncated from the
  left to 256 word pieces) and ``q = e(response)``; ``phi = [p, q, p * q]`` (1152 floats).
* a policy (``smollm2-135m-instruct`` or any causal-LM path / hub id): the policy's last hidden states on its
  chat template ``[user: prompt, assistant: response]`` (prompt left-truncated to 128 tokens, response to the
  first 128), mean-pooled over all tokens and over the response tokens, concatenated (2 x hidden size).

Backbone choice, measured (``benchmarks/reward_models.py --compare-backbones``; 5-fold grouped CV on the same
300 HH pairs per objective, 2 busy CPU cores): SmolLM2-135M mean-pooled states were *more* accurate on that small
subset (best head each: helpful 0.64 vs 0.53, harmless 0.62 vs 0.59; the concatenated recipe above 0.61 and 0.61)
but ~10x slower to score
(~1 pair/s vs ~7 pairs/s, ~12 with the prompt embedding cached, as in decoding where one prompt meets many
candidates). Trained on all ~4k/1.6k training pairs, the MiniLM heads reach held-out accuracy 0.62 (helpful) and
0.63 (harmless), so MiniLM is the default and ships; objectives are scored at every decoding block, where speed
matters. Head hyper-parameters (MLP with 64 hidden units, strong decoupled weight decay 30, 30 epochs) were
chosen by 5-fold CV on the training prompts only.

Saved layout (``output_dir``): ``head.safetensors`` (head weights + feature mean/std), ``reward_config.json``
(backbone, feature recipe, objective, data, seed, metrics, versions) and a model card ``README.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from moalign.compute import model_cost, record_read, scope_store
from moalign.errors import MoalignError
from moalign.objectives.base import Objective

FORMAT = "moalign-bradley-terry-v1"
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "reward_config.json"


# --------------------------------------------------------------------------------------------- backbones
class Backbone:
    """A frozen feature map ``phi(prompt, response) -> [n, dim]`` (float32, CPU)."""

    name: str = "backbone"
    recipe: str = ""
    dim: int = 0

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "recipe": self.recipe, "dim": self.dim}


class MiniLMBackbone(Backbone):
    """``[p, q, p * q]`` from unit all-MiniLM-L6-v2 embeddings of the prompt (left-truncated) and response."""

    name = "minilm"
    recipe = "minilm-pq: [e(prompt), e(response), e(prompt)*e(response)], all-MiniLM-L6-v2 unit embeddings"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64):
        from moalign.objectives.embeddings import MINILM_DIM

        self.device = str(torch.device(device))
        self.batch_size = batch_size
        self.dim = 3 * MINILM_DIM

    def features(self, prompts, responses):
        from moalign.objectives.embeddings import encode

        p = encode(list(prompts), side="left", device=self.device, batch_size=self.batch_size)
        q = encode(list(responses), side="right", device=self.device, batch_size=self.batch_size)
        return torch.cat([p, q, p * q], dim=1)


class PolicyBackbone(Backbone):
    """Mean-pooled last hidden states of a causal LM on its chat template [user: prompt, assistant: response].

    Features are ``[mean over all tokens, mean over response tokens]`` (the response mean falls back to the
    last prompt token for an empty response).
    """

    def __init__(
        self,
        policy: str = "smollm2-135m-instruct",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        max_prompt_tokens: int = 128,
        max_response_tokens: int = 128,
    ):
        from moalign.policies import load_policy

        self.policy_name = policy
        self.name = f"policy:{policy}"
        self.device = str(torch.device(device))
        pol = load_policy(policy, device=self.device)
        self.model, self.tok = pol.model, pol.tokenizer
        self.base = getattr(self.model, "base_model", None) or self.model
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        hidden = int(self.model.config.hidden_size)
        self.dim = 2 * hidden
        self.recipe = (
            f"policy-meanpool: [mean_all(h), mean_response(h)], last hidden states of {policy} on its chat "
            f"template, prompt <= {max_prompt_tokens} tokens (left-truncated), response <= {max_response_tokens}"
        )

    def _ids(self, prompt: str, response: str) -> tuple[list[int], int]:
        from moalign.data.prompts import prompt_messages
        from moalign.policies import render_chat

        head = render_chat(self.tok, prompt_messages(prompt))
        p_ids = self.tok(head, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens :]
        r_ids = (
            self.tok(response, add_special_tokens=False)["input_ids"][: self.max_response_tokens]
            if response
            else []
        )
        return p_ids + r_ids, len(p_ids)

    @torch.inference_mode()
    def features(self, prompts, responses):
        items = [self._ids(p, r) for p, r in zip(prompts, responses)]
        store = scope_store(("policy-backbone", id(self.base)), self._new_store)
        if store is not None:  # within a search: running sums, each candidate reads what is new since its parent
            return self._features_incremental(store, list(prompts), items)
        out = torch.empty(len(items), self.dim, dtype=torch.float32)
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            L = max(len(items[i][0]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), L, dtype=torch.long)
            rmask = torch.zeros(len(idx), L, dtype=torch.float32)
            for row, i in enumerate(idx):
                seq, n_p = items[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                if len(seq) > n_p:
                    rmask[row, n_p : len(seq)] = 1
                else:
                    rmask[row, n_p - 1] = 1
            h = self.base(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state
            h = h.float().cpu()
            m = mask.float().unsqueeze(-1)
            mean_all = (h * m).sum(1) / m.sum(1)
            rm = rmask.unsqueeze(-1)
            mean_resp = (h * rm).sum(1) / rm.sum(1)
            out[idx] = torch.cat([mean_all, mean_resp], dim=1)
        record_read(model_cost(self.model, self.name), [len(seq) for seq, _ in items])
        return out

    def _new_store(self):
        from moalign.objectives.incremental import IncrementalScorer

        return IncrementalScorer(self.base, self.tok.pad_token_id, head=False, sums=True)

    def _features_incremental(self, store, prompts: list[str], items) -> torch.Tensor:
        """:meth:`features` from the store's running sums of the last hidden states (equal to the batched
        forward's means up to float rounding)."""
        entries, read = store.entries(prompts, [seq for seq, _ in items])
        out = torch.empty(len(items), self.dim, dtype=torch.float32)
        for i, (e, (seq, n_p)) in enumerate(zip(entries, items)):
            c, L = e.csum, len(seq)
            if L > n_p:
                resp = (c[L - 1] - c[n_p - 1]) / (L - n_p)
            else:  # an empty response: the last prompt token's state
                resp = c[n_p - 1] - (c[n_p - 2] if n_p >= 2 else 0)
            out[i] = torch.cat([c[L - 1] / L, resp])
        record_read(model_cost(self.model, self.name), read)
        return out

    def describe(self) -> dict:
        return {**super().describe(), "policy": self.policy_name}


_BACKBONES: dict[tuple, Backbone] = {}


def make_backbone(name: str, device: str | torch.device = "cpu") -> Backbone:
    """``minilm`` or a policy (bundled name, local path or hub id); one instance per (name, device)."""
    key = (name, str(torch.device(device)))
    if key not in _BACKBONES:
        _BACKBONES[key] = MiniLMBackbone(device) if name == "minilm" else PolicyBackbone(name, device)
    return _BACKBONES[key]


# -------------------------------------------------------------------------------------------------- head
class RewardHead(nn.Module):
    """``r(x) = w . z`` (``hidden == 0``) or ``w2 . gelu(W1 z + b1)``, with ``z = (x - mean) / std``."""

    def __init__(self, dim: int, hidden: int = 0):
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1, bias=False))
        else:
            self.net = nn.Linear(dim, 1, bias=False)  # a bias cancels in r(c) - r(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std).squeeze(-1)


class BradleyTerryObjective(Objective):
    """A saved Bradley-Terry reward model as an :class:`Objective` (backbone loaded on first use)."""

    batch_size = 64

    def __init__(self, head: RewardHead, config: dict, path: str | None = None, device: str = "cpu",
                 name: str | None = None):  # fmt: skip
        self.head = head.eval()
        self.config = config
        self.path = path
        self.device = str(torch.device(device))
        self.name = name or config.get("objective") or "reward"
        self._backbone: Backbone | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", name: str | None = None) -> BradleyTerryObjective:
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / CONFIG_FILE).exists() or not (p / HEAD_FILE).exists():
            raise MoalignError(
                f"not a Bradley-Terry reward model folder (needs {CONFIG_FILE} and {HEAD_FILE}): {p}"
            )
        try:
            conf = json.loads((p / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise MoalignError(f"{p / CONFIG_FILE} is not valid JSON: {e.msg}") from None
        if conf.get("format") != FORMAT:
            raise MoalignError(f"{p}: unknown reward model format {conf.get('format')!r} (expected {FORMAT})")
        head = RewardHead(int(conf["feature_dim"]), int(conf["head"]["hidden"]))
        head.load_state_dict(load_file(str(p / HEAD_FILE)))
        return cls(head, conf, path=str(p), device=device, name=name)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = make_backbone(self.config["backbone"], self.device)
        return self._backbone

    def to(self, device: str) -> BradleyTerryObjective:
        self.device = str(torch.device(device))
        self._backbone = None
        return self

    @torch.no_grad()
    def _score(self, prompts, responses):
        return self.head(self.backbone.features(prompts, responses))

    def describe(self) -> dict:
        m = self.config.get("metrics", {})
        return {
            "name": self.name,
            "type": "bradley_terry",
            "path": self.path,
            "backbone": self.config.get("backbone"),
            "data": self.config.get("data"),
            "heldout_accuracy": m.get("heldout_accuracy"),
        }


def is_bradley_terry_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / HEAD_FILE).is_file()
