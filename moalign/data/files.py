"""Read records from local files (JSONL, JSON, CSV, TXT; gzip too) or hub datasets."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator

from moalign.errors import MoalignError


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _suffix(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def read_records(source: str, split: str = "test") -> Iterator[dict] | list[dict]:
    """Records (dicts) from a local file, or from a hub dataset when ``source`` is not a path.

    A hub source may name a split as ``owner/name:split``.
    """
    if os.path.exists(source):
        return list(_read_file(source))
    if source.endswith((".jsonl", ".json", ".csv", ".txt", ".gz")) or source.startswith((".", "/")):
        raise MoalignError(f"file not found: {source}")
    return _read_hub(source, split)


def _read_file(path: str) -> Iterator[dict]:
    suf = _suffix(path)
    try:
        with _open_text(path) as f:
            if suf == ".jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise MoalignError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                        yield rec if isinstance(rec, dict) else {"prompt": rec}
            elif suf == ".json":
                data = json.load(f)
                if isinstance(data, dict):
                    data = next((v for v in data.values() if isinstance(v, list)), [data])
                for rec in data:
                    yield rec if isinstance(rec, dict) else {"prompt": rec}
            elif suf == ".csv":
                yield from csv.DictReader(f)
            elif suf == ".txt":
                for line in f:
                    if line.strip():
                        yield {"prompt": line.rstrip("\n")}
            else:
                raise MoalignError(f"{path}: unsupported file type {suf!r} (use .jsonl, .json, .csv, .txt)")
    except (OSError, gzip.BadGzipFile) as e:
        raise MoalignError(f"cannot read {path}: {e}") from None


def _read_hub(source: str, split: str) -> list[dict]:
    name, _, sp = source.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=sp or split)
    except Exception as e:  # hub or network failures become one clear line
        raise MoalignError(
            f"cannot load dataset {source!r} (not a local file, hub load failed: {e})"
        ) from None
    return [dict(r) for r in ds]
