"""scripts/uv_args.py: pip's configuration passed on to uv, so that setup.sh installs from the same places."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from uv_args import parse, uv_args  # scripts/ (see conftest)

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/env-wheels'
:env:.default-timeout='180'
global.cert='/etc/ssl/certs/other.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
install.index-url='https://mirror.example/simple'
site.no-index='false'
"""


def test_environment_overrides_files_and_every_location_is_passed_on():
    cfg = parse(LISTING)
    assert cfg["find-links"] == ["/opt/env-wheels"]  # PIP_FIND_LINKS wins over the config file
    assert cfg["extra-index-url"] == ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"]
    assert "no-index" not in cfg  # 'site.' is not a section pip lists options under
    args = uv_args(cfg)
    assert args[:2] == ["--index-strategy", "unsafe-best-match"]  # pip's best version across all indexes
    pairs = list(zip(args[2::2], args[3::2]))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs and ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--find-links", "/opt/env-wheels") in pairs and ("--find-links", "/opt/wheels") not in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert args[-1] == "env:SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
    assert "--no-index" in uv_args(parse("global.no-index='true'\n"))
    assert uv_args(parse("")) == ["--index-strategy", "unsafe-best-match"]  # no configuration: uv's defaults


def test_the_script_reads_this_interpreters_pip():
    script = Path(__file__).resolve().parents[2] / "scripts" / "uv_args.py"
    lines = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[:2] == ["--index-strategy", "unsafe-best-match"]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for value in parse(listed).get("find-links", []):
        assert value in lines  # whatever find-links this machine's pip uses, uv gets too
