"""Typed run configurations. Every field is a CLI flag (``--field-name``); a run saves its config so that
``--config FILE`` reproduces it (flags given on the command line override the file).

``GenerateConfig`` (and ``CompareConfig``, which extends it) holds every registered decoding method's own
settings, so it is composed from the method registry on first use (PEP 562 ``__getattr__``): importing this
module for another config (``EvaluateConfig``) loads no decoding method.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from moalign.configbase import config_field, versions  # noqa: F401  (versions: re-exported)
from moalign.decoding.registry import (
    BACKENDS,
    available_methods,
    foreign_settings,
    get_method,
    method_arg_fields,
)
from moalign.errors import ForeignSettingError, MoalignError, SettingError

_f = config_field


@dataclass
class RunSettings:
    """The run and its data: the policy, objectives, prompts, output, seed and devices."""

    method: str = _f("sample", "decoding method", choices=available_methods)
    policy: str = _f("smollm2-135m-instruct", "policy: bundled name, local path (folder or .gguf) or hub id")
    objectives: str = _f("helpful,harmless", "comma-separated objectives (names or rm:PATH[@INDEX])")
    prompts: str = _f("", "prompts: JSONL/JSON/CSV/TXT file (gzip too) or hub dataset id[:split]")
    prompt_column: str | None = _f(None, "column holding the prompt (default: first of prompt/messages/...)")
    out: str = _f("", "output JSONL file (records are appended as produced; an existing file is resumed)")
    skip_invalid: bool = _f(
        False, "skip prompt records that cannot be read (e.g. no final user turn) and report how many"
    )
    limit: int | None = _f(None, "use only the first N prompts")
    batch_size: int = _f(4, "prompts decoded together (rows = batch_size x K)")
    seed: int = _f(0, "random seed")
    normalize: str = _f(
        "auto",
        "objective scaling: auto (shipped z-score stats where known, else estimated from policy samples) | "
        "none (raw) | PATH to a stats JSON",
    )
    system_prompt: str | None = _f(None, "system prompt added before every conversation")
    device: str | None = _f(None, "torch device (default: cuda if available, else cpu)")
    dtype: str = _f(
        "auto",
        "policy weights' dtype: auto (as the checkpoint was saved; float32 for a GGUF file) | bfloat16 | "
        "float16 | float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    objective_device: str | None = _f(
        None,
        "device of the neural objectives and value heads: 'policy' (the policy's device) or a torch device "
        "(cpu, cuda:1, ...); default: objectives on $MOALIGN_OBJECTIVE_DEVICE or cpu, value heads on the "
        "policy's device",
    )
    encoder_url: str = _f(
        "",
        "serve the MiniLM encoder: URL of an OpenAI-compatible embeddings server (llama.cpp's llama-server "
        "--embedding, TEI, vLLM) serving all-MiniLM-L6-v2, http://HOST:PORT/v1[#MODEL]; the objectives built on "
        "it (helpful, harmless, relevant) embed there (default: in process)",
    )
    encoder_api_key_env: str | None = _f(
        None, "environment variable holding the encoder server's API key (sent as a bearer token)"
    )


@dataclass
class SamplingSettings:
    """How the policy samples (every method)."""

    max_new_tokens: int = _f(64, "maximum new tokens per response")
    temperature: float = _f(1.0, "sampling temperature (0 = greedy)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    top_k: int = _f(0, "top-k sampling (0 = off)")


@dataclass
class ServerSettings:
    """The policy on an OpenAI-compatible completions server (``backend="server"``)."""

    backend: str = _f(
        "local",
        "where the policy runs: local (in-process transformers engine) or server (an OpenAI-compatible "
        "completions endpoint, --base-url)",
        choices=lambda: tuple(BACKENDS),
    )
    base_url: str = _f("", "server: the completions endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
    model: str | None = _f(None, "server: the served model's name (default: the server's first model)")
    api_key_env: str | None = _f(
        None, "server: environment variable holding the API key (sent as a bearer token; default: none)"
    )
    tokenizer: str | None = _f(
        None,
        "server: the policy's tokenizer, loaded locally for the chat template, end-of-turn ids and token-id "
        "continuation: bundled name, local path or hub id (default: --policy)",
    )
    server_capabilities: str = _f(
        "auto",
        "server: auto (probe the server) | none (text prompts, one choice per request) | a comma list of "
        "token_ids (token-id prompts in, generated ids out: vLLM), n (several choices per request)",
    )
    max_concurrency: int = _f(8, "server: requests in flight at once")
    request_timeout: float = _f(120.0, "server: seconds before a request is given up (then retried)")
    retries: int = _f(3, "server: retries of a failed request (connection error, timeout, HTTP 429/5xx), "
                         "with exponential backoff")  # fmt: skip


#: the groups of ``generate``'s settings every method shares (one argument group each on the command line)
SETTING_GROUPS = (RunSettings, SamplingSettings, ServerSettings)


@dataclass
class _GenerateSettings(ServerSettings, SamplingSettings, RunSettings):
    """``moalign generate``: decode responses for prompts with one method (the settings every method
    shares; each method's own settings are added from the method registry)."""

    def validate(self) -> None:
        get_method(self.method)  # names the known methods when it is not one
        for name in ("max_new_tokens", "batch_size", "max_concurrency"):
            if getattr(self, name) < 1:
                raise SettingError("generate", name, f"must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise SettingError("generate", "limit", f"must be >= 1, got {self.limit}")
        if not self.request_timeout > 0:
            raise SettingError("generate", "request_timeout", f"must be > 0, got {self.request_timeout}")
        if self.retries < 0:
            raise SettingError("generate", "retries", f"must be >= 0, got {self.retries}")
        if self.backend not in BACKENDS:
            raise SettingError("generate", "backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "server":
            from moalign.decoding.server_client import ServerCapabilities

            ServerCapabilities.parse(self.server_capabilities)  # an unknown capability fails before connecting
        self.refuse_foreign_settings()
        self.method_args()

    def refuse_foreign_settings(self) -> None:
        """A setting of another method, set away from its default, is an error, not silently dropped
        (``--method cd --lam 0.1``; a config file or ``GenerateConfig(method="cd", lam=0.1)`` alike)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, owners in foreign_settings(self.method).items():
            if getattr(self, name) != defaults.get(name):
                raise ForeignSettingError(self.method, name, owners)

    def method_args(self):
        """The chosen method's own settings (its args dataclass, validated), or None."""
        return get_method(self.method).make_args(dataclasses.asdict(self))


@dataclass
class EvaluateConfig:
    """``moalign evaluate``: per-objective and worst-case metrics of one or more runs."""

    inputs: list[str] = _f(list, "JSONL files written by `moalign generate`", nargs="+")
    objectives: str | None = _f(None, "objectives to report (default: those scored in the inputs)")
    reference: str | None = _f(None, "the run (one of --inputs) that win rates are measured against")
    normalize: str = _f("auto", "auto (stats saved with the runs) | none | PATH to a stats JSON")
    rescore: bool = _f(
        False, "score the responses again instead of using the scores in the files (judge scores too)"
    )
    judges: str | None = _f(
        None,
        "comma-separated judge objectives (names or rm:PATH[@INDEX]) that score the responses beside the "
        "proxy objectives; judge scores are cached in RUN.judges.jsonl beside each run",
    )
    n_boot: int = _f(1000, "bootstrap resamples for confidence intervals")
    seed: int = _f(0, "bootstrap seed")
    json: bool = _f(False, "print the result as JSON instead of a table")
    plot: str | None = _f(None, "write a comparison plot (PNG) here")


@dataclass
class _CompareSettings:
    """``moalign compare``: several methods on the same prompts, then evaluate and plot."""

    methods: str = _f(
        "sample,best-of-n,cd",
        "comma-separated methods; a method may repeat with its own settings, e.g. rmod:lam=0.1:k=8",
    )
    out_dir: str = _f("runs/compare", "folder for one JSONL per method, summary.json and comparison.png")
    judges: str | None = _f(
        None,
        "comma-separated judge objectives (names or rm:PATH[@INDEX]) that score the responses after decoding "
        "with --objectives, reported beside them; cached in OUT_DIR/LABEL.judges.jsonl",
    )
    n_boot: int = _f(1000, "bootstrap resamples for confidence intervals")


@dataclass
class _FrontSettings:
    """``moalign front``: Pareto fronts in objective space; methods that take preference weights swept over a
    grid of the simplex, the others as points, on the same prompts and seeds; proxy and judge side by side."""

    weighted: str = _f("best-of-n,cd", "methods swept over the weight grid (a weighted --scalarization each)")
    points: str = _f("sample,rmod", "methods without weights, one point each (may be empty)")
    trained: str = _f(
        "",
        "trained policies as points beside the decoding methods: LABEL=POLICY,... (a folder, e.g. an IAMA or DPO "
        "output dir, or any policy name); each point is plain sampling of that policy on the same prompts",
    )
    steps: int = _f(4, "weight grid: multiples of 1/STEPS on the simplex (STEPS + 1 weights for two objectives)")
    ref: str | None = _f(
        None,
        "hypervolume reference point, one raw value per objective (judge space: per judge), e.g. -1,-1; default: "
        "per objective the lowest mean of any point less a tenth of the spread",
    )
    out_dir: str = _f("runs/front", "folder for one JSONL per run, front.json, front.md and front.png")
    judges: str | None = _f(None, "comma-separated judge objectives whose space is summarised beside the proxy's")
    n_boot: int = _f(1000, "bootstrap resamples over prompts for the intervals")


def _compose() -> None:
    """Build ``GenerateConfig`` (the shared settings + every registered method's own) and ``CompareConfig``."""
    global GenerateConfig, CompareConfig, FrontConfig
    GenerateConfig = dataclasses.make_dataclass(
        "GenerateConfig",
        method_arg_fields(),
        bases=(_GenerateSettings,),
        namespace={"__doc__": _GenerateSettings.__doc__, "__module__": __name__},
    )
    CompareConfig = dataclasses.make_dataclass(
        "CompareConfig",
        [(f.name, f.type, f) for f in dataclasses.fields(_CompareSettings)],
        bases=(GenerateConfig,),
        namespace={"__doc__": _CompareSettings.__doc__, "__module__": __name__},
    )
    FrontConfig = dataclasses.make_dataclass(
        "FrontConfig",
        [(f.name, f.type, f) for f in dataclasses.fields(_FrontSettings)],
        bases=(GenerateConfig,),
        namespace={"__doc__": _FrontSettings.__doc__, "__module__": __name__},
    )


def __getattr__(name: str):
    if name in ("GenerateConfig", "CompareConfig", "FrontConfig"):
        _compose()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def for_method(cfg, method: str, **overrides):
    """``cfg`` (a shared base: compare's global flags, a benchmark's settings) for one ``method``: the settings
    only other methods have go back to their defaults, then ``overrides`` apply (one the method does not have
    is refused by ``validate``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    reset = {k: defaults[k] for k in foreign_settings(method) if k in defaults}
    return dataclasses.replace(cfg, **{**reset, "method": method, **overrides})


def refuse_unused_method_flags(cfg, methods: list[str]) -> None:
    """A method's setting given to a run of several methods (``compare``, ``front``; away from its default) that
    none of ``methods`` has is an error: it would change nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    owned = {f.name for m in methods if get_method(m).args for f in dataclasses.fields(get_method(m).args)}
    for name, owners in foreign_settings(methods[0]).items():
        if name not in owned and getattr(cfg, name) != defaults.get(name):
            raise MoalignError(f"--{name.replace('_', '-')} belongs to {', '.join(owners)}, none of the methods "
                               f"compared ({', '.join(dict.fromkeys(methods))})")  # fmt: skip


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config_file(path: str) -> dict:
    """A JSON config (or the sidecar ``*.meta.json`` of a run, whose ``config`` key is used)."""
    p = Path(path)
    if not p.exists():
        raise MoalignError(f"config file not found: {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoalignError(f"config file {path} is not valid JSON: {e.msg}") from None
    if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    return data


def build_config(cls, values: dict):
    """Instantiate a config dataclass from a dict, naming unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MoalignError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**values)
