"""``python scripts/uv_args.py``: print, one per line, the ``uv pip install`` arguments that make uv install from
the same places pip would: pip's own configuration (``pip config list``: its config files and ``PIP_*``
variables) translated to uv's flags. uv reads no pip configuration, so without this it would ignore e.g. a
local ``find-links`` folder holding the CPU build of torch and fetch the registry's default build instead.

Translated: ``index-url``, ``extra-index-url``, ``find-links``, ``constraint``, ``no-index``; pip's choice of
the best version across all indexes is kept (``--index-strategy unsafe-best-match``; uv's default takes a
package from the first index that has it). ``cert`` goes to uv as the ``SSL_CERT_FILE`` variable, printed
as ``env:SSL_CERT_FILE=...`` for scripts/setup.sh to export. Anything else pip is configured with is not
translated, and setup.sh falls back to pip when uv fails."""

from __future__ import annotations

import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}  # fmt: skip
# pip's sections, lowest precedence first (environment variables override the files)
SECTIONS = ("global", "install", ":env:")


def parse(listing: str) -> dict[str, list[str]]:
    """``pip config list`` output -> {option: values}, the highest-precedence section winning per option."""
    found: dict[str, dict[str, list[str]]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        section, dot, option = key.rpartition(".")
        if not sep or not dot or section not in SECTIONS:
            continue
        found.setdefault(option, {})[section] = shlex.split(value)[0].split() if value.strip() else []
    return {opt: next(by[s] for s in reversed(SECTIONS) if s in by) for opt, by in found.items()}


def uv_args(config: dict[str, list[str]]) -> list[str]:
    args = ["--index-strategy", "unsafe-best-match"]
    for option, flag in FLAGS.items():
        for value in config.get(option, []):
            args += [flag, value]
    if config.get("no-index", ["0"])[0].lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if config.get("cert"):
        args.append("env:SSL_CERT_FILE=" + config["cert"][0])
    return args


if __name__ == "__main__":
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    print("\n".join(uv_args(parse(out.stdout if out.returncode == 0 else ""))))
