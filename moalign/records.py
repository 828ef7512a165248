"""Run outputs: JSONL records appended as they are produced, a ``.meta.json`` sidecar, and resume."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from moalign.errors import MoalignError


def meta_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".meta.json")


def read_records(path: str | Path) -> list[dict]:
    """Every complete record of a JSONL run file (a truncated last line from an interrupted run is skipped)."""
    p = Path(path)
    if not p.exists():
        raise MoalignError(f"file not found: {path}")
    out = []
    with p.open(encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # interrupted mid-write
                continue
            raise MoalignError(f"{path}: line {n} is not valid JSON") from None
    return out


class RecordWriter:
    """Append records to a JSONL file, flushing each one, and know which keys are already done."""

    def __init__(self, path: str | Path, meta: dict, resume_keys: Iterable[str] = ("config",),
                 ignore: Iterable[str] = ()):  # fmt: skip
        """``ignore``: settings that cannot change the records (e.g. other methods' settings), not compared
        when resuming."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.meta_before: dict | None = None  # the meta of the run this one resumes
        mp = meta_path(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            old = json.loads(mp.read_text()) if mp.exists() else None
            self.meta_before = old
            if old is not None:
                for key in resume_keys:
                    a, b = _comparable(old.get(key), ignore), _comparable(meta.get(key), ignore)
                    # a setting the interrupted run's version did not have yet is not a difference
                    b = {k: v for k, v in b.items() if k in a}
                    if a != b:
                        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                        raise MoalignError(
                            f"{self.path} holds a run with a different {key} ({', '.join(diff)}); "
                            "use another --out or delete the file"
                        )
            self.done = {r["record_id"] for r in read_records(self.path) if "record_id" in r}
            self._truncate_partial_line()
        mp.write_text(json.dumps(meta, indent=2, default=str))
        self._f = self.path.open("a", encoding="utf-8")

    def _truncate_partial_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)

    def update_meta(self, extra: dict) -> None:
        """Add ``extra`` to the run's ``.meta.json`` (e.g. what a method reports at the end of a run)."""
        mp = meta_path(self.path)
        meta = json.loads(mp.read_text()) if mp.exists() else {}
        mp.write_text(json.dumps({**meta, **extra}, indent=2, default=str))

    def write(self, record: dict) -> None:
        if record["record_id"] in self.done:
            return
        self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(record["record_id"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# config fields that may change between an interrupted run and its resumption
# settings that may change between an interrupted run and its resumption without changing its records
_RESUMABLE = {"limit", "out", "out_dir", "device", "methods", "n_boot", "base_url", "api_key_env",
              "max_concurrency", "request_timeout", "retries", "objective_device", "encoder_url",
              "encoder_api_key_env"}  # fmt: skip


def _comparable(cfg, ignore: Iterable[str] = ()) -> dict:
    if not isinstance(cfg, dict):
        return {}
    skip = _RESUMABLE | set(ignore)
    return {k: v for k, v in cfg.items() if k not in skip}
