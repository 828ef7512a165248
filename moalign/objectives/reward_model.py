"""Any hub or local ``AutoModelForSequenceClassification`` reward model as an objective.

Spec: ``PATH_OR_HUB_ID[@INDEX]`` (as ``rm:PATH_OR_HUB_ID[@INDEX]`` in objective lists). ``INDEX`` picks one
output of a multi-output model (ArmoRM-style ``rewards``, or a column of ``logits``); single-output models
need none. A local folder holding a moalign Bradley-Terry model (``reward_config.json``) loads as
:class:`~moalign.objectives.bradley_terry.BradleyTerryObjective`.

Input formatting. The reward model's own tokenizer is used. When it has a chat template, the template is
applied to ``[user: prompt, assistant: response]`` (an HH-style multi-turn prompt is split into its turns);
otherwise the text is ``prompt + "\\n\\n" + response`` with the tokenizer's special tokens. Sequences are
truncated on the right to the model's maximum length (``max_length`` or the tokenizer's / config's limit,
capped at 4096).

One model, several objectives. A multi-output model named twice (``rm:PATH@0,rm:PATH@3``) is loaded once, and
the objectives built on it run it once per batch of pairs: the second objective scoring the same pairs reads
the outputs the first one computed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moalign.compute import model_cost, record_read, scope_store
from moalign.data.prompts import prompt_messages
from moalign.errors import MoalignError
from moalign.objectives.base import Objective, shared_output_memo
from moalign.objectives.incremental import IncrementalScorer, supports_incremental

_SPEC = re.compile(r"^(?P<src>.+?)(?:@(?P<idx>-?\d+))?$")
#: (source, its files' modification time, dtype, trust_remote_code) -> (model, tokenizer): loaded once
_LOADED: dict[tuple, tuple] = {}


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"PATH_OR_ID@3"`` -> ``("PATH_OR_ID", 3)``; no suffix -> index ``None``."""
    spec = spec.strip()
    if spec.startswith("rm:"):
        spec = spec[3:]
    m = _SPEC.match(spec)
    if not spec or m is None:
        raise MoalignError(f"reward model spec must be PATH_OR_HUB_ID[@INDEX], got {spec!r}")
    idx = m.group("idx")
    return m.group("src"), None if idx is None else int(idx)


def format_pair(tokenizer, prompt: str, response: str) -> str:
    """The text a reward model with ``tokenizer`` reads for a pair: its chat template on [user turns ...,
    assistant: response] where it has one, else ``prompt + "\\n\\n" + response``."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [*prompt_messages(prompt), {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return f"{prompt}\n\n{response}"


class RewardModelObjective(Objective):
    """A sequence-classification reward model; the score is one output (logit) per (prompt, response)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        index: int | None = None,
        name: str | None = None,
        source: str = "",
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        max_length: int | None = None,
        incremental: bool = True,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.index = index
        self.source = source
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.name = name or (Path(source).name or source) + ("" if index is None else f"@{index}")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if (
            getattr(self.model.config, "pad_token_id", None) is None
            and self.tokenizer.pad_token_id is not None
        ):
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        limits = [4096]
        tml = getattr(tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            limits.append(tml)
        mpe = getattr(model.config, "max_position_embeddings", None)
        if isinstance(mpe, int) and mpe > 0:
            limits.append(mpe)
        self.max_length = int(max_length) if max_length else min(limits)
        n_out = getattr(model.config, "num_labels", 1)
        if (
            index is not None
            and not -n_out <= index < max(n_out, 1)
            and not hasattr(model.config, "num_objectives")
        ):
            raise MoalignError(f"reward model {source!r} has {n_out} outputs; index {index} is out of range")
        self.model.to(self.device)
        # within a search, a decoder reward model reads only what is new since a candidate's parent
        self.incremental = bool(incremental) and supports_incremental(self.model)

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        device: str | torch.device = "cpu",
        name: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> Objective:
        """Load ``PATH_OR_HUB_ID[@INDEX]`` (a moalign Bradley-Terry folder loads as that objective)."""
        src, index = parse_spec(spec)
        if src.startswith("~"):
            src = str(Path(src).expanduser())
        from moalign.objectives.bradley_terry import BradleyTerryObjective, is_bradley_terry_dir

        if is_bradley_terry_dir(src):
            if index is not None:
                raise MoalignError(f"{src} is a single-output Bradley-Terry model; drop @{index}")
            return BradleyTerryObjective.load(src, device=str(device), name=name)
        p = Path(src)
        if (src.startswith((".", "/", "~")) or src.count("/") > 1) and not p.exists():
            raise MoalignError(f"reward model path not found: {src}")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        stamp = max((f.stat().st_mtime_ns for f in p.iterdir()), default=0) if p.is_dir() else 0
        key = (str(p.resolve()) if p.exists() else src, stamp, str(dtype), bool(trust_remote_code))
        try:
            if key not in _LOADED:
                tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    src, dtype=dtype, trust_remote_code=trust_remote_code
                )
                _LOADED[key] = (model, tok)
            model, tok = _LOADED[key]
        except (OSError, ValueError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MoalignError(
                f"cannot load reward model {src!r}: {first} (a hub id needs network access or a local cache; "
                "with HF_HUB_OFFLINE=1 give a local folder)"
            ) from None
        return cls(model, tok, index=index, name=name, source=src, device=device, batch_size=batch_size,
                   max_length=max_length)  # fmt: skip

    def to(self, device: str | torch.device) -> RewardModelObjective:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model reads (see the module docstring)."""
        return format_pair(self.tokenizer, prompt, response)

    def _encode(self, prompts, responses, **kw):
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        kw = {"return_tensors": "pt", "padding": True, **kw}
        return self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=not templated,  # a chat template writes its own BOS
            **{k: v for k, v in kw.items() if v is not None},
        )

    @torch.inference_mode()
    def _outputs(self, prompts, responses):
        """The model's outputs on these pairs; within :func:`~moalign.objectives.base.shared_outputs`,
        computed once for every objective that reads this model."""
        memo = shared_output_memo()
        key = (id(self.model), tuple(prompts), tuple(responses), self.max_length, str(self.device))
        if memo is not None and key in memo:
            return memo[key]
        cost = model_cost(self.model, self.source or self.name)
        store = scope_store(("incremental", id(self.model), self.max_length), self._new_store) \
            if self.incremental else None  # fmt: skip
        if store is not None:  # within a search: what is new since each candidate's parent
            ids = self._encode(prompts, responses, return_tensors=None, padding=False)["input_ids"]
            logits, read = store.logits(list(prompts), ids)
            from transformers.modeling_outputs import SequenceClassifierOutput

            out = SequenceClassifierOutput(logits=logits.to(self.device))
        else:
            enc = {k: v.to(self.device) for k, v in self._encode(prompts, responses).items()}
            out = self.model(**enc)
            read = enc["attention_mask"].sum(dim=1).tolist()
        record_read(cost, read)
        if memo is not None:
            memo[key] = out
        return out

    def _new_store(self) -> IncrementalScorer:
        pad = self.model.config.get_text_config().pad_token_id
        return IncrementalScorer(self.model, pad)

    def _score(self, prompts, responses):
        out = self._outputs(prompts, responses)
        rewards = getattr(out, "rewards", None)  # ArmoRM-style multi-objective heads
        logits = getattr(out, "logits", None)
        if rewards is not None and self.index is not None:
            return rewards[:, self.index].float()
        score = getattr(out, "score", None)
        if score is not None and self.index is None and logits is None:
            return score.reshape(-1).float()
        if logits is None:
            raise MoalignError(
                f"reward model {self.source!r} returned no logits (outputs: {list(out.keys())})"
            )
        if logits.ndim == 1:
            logits = logits[:, None]
        if self.index is not None:
            return logits[:, self.index].float()
        if logits.shape[-1] != 1:
            raise MoalignError(
                f"reward model {self.source!r} has {logits.shape[-1]} outputs; choose one with "
                f"rm:{self.source}@INDEX"
            )
        return logits[:, 0].float()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": "reward_model",
            "source": self.source,
            "index": self.index,
            "max_length": self.max_length,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "incremental": self.incremental,
        }
