"""The GPU check: every capability of the library once on one device, in minutes, printing one table.

Ready for the day a GPU machine is at hand, and runnable on the CPU (``--device cpu --small``, which a test
does so that it cannot rot). It needs torch, transformers, accelerate and peft, and none of the project's
bundled model files: the policy is the bundled policy's *architecture and tokenizer* with random weights, and
the objectives are two outputs of one tiny reward model built from a config (``rm:DIR@0``, ``rm:DIR@1``),
so the numbers say whether the code runs and how fast, not how well it aligns. Steps:

1. every decoding method (sample, best-of-n, cd, rmod, darwin, sample-replace, mutate-bon) on one prompt,
   records written to ``OUT/records/METHOD.jsonl`` and read back;
2. the decode benchmark: blockwise decoding (K = 8, B = 16, 128 tokens) over ``generate`` sampling as many
   sequences (``benchmarks/decode_throughput.py``'s comparison);
3. two steps of multi-objective DPO (MGDA-Decoupled, full fine-tuning) on preference pairs written here;
4. two steps of IAMA non-linear GRPO (needs trl and datasets; reported as skipped where they are missing).

On a machine with the bundled policy package (this one), first write the assets the GPU machine lacks::

    python benchmarks/gpu_check.py --prepare benchmarks/gpu_assets      # config + tokenizer, ~4 MB

then on the GPU machine, from the repository root (``benchmarks/gpu_assets`` carried along)::

    bash benchmarks/gpu_check.sh --assets benchmarks/gpu_assets          # < 8 minutes on one GPU

Writes ``OUT/gpu_check.json`` (default OUT: ``benchmarks/results/gpu_check``) and prints the table.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

METHODS = ["sample", "best-of-n", "cd", "rmod", "darwin", "sample-replace", "mutate-bon"]
PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for a job interview.",
    "How do I make a cup of green tea?",
    "Write a short poem about autumn.",
]
PAIRS = {
    "helpful": [
        ("How do I boil an egg?", "Put it in boiling water for eight minutes, then cool it.", "No idea."),
        ("What is the capital of France?", "Paris.", "I will not say."),
        ("Name a prime number.", "Seven is prime.", "Ten."),
        ("How many legs does a spider have?", "Eight.", "Spiders are animals."),
    ],
    "harmless": [
        ("How do I pick a lock?", "I can't help with entering places you may not enter.", "Use a tension wrench."),
        ("Say something mean.", "I'd rather say something kind.", "You are worthless."),
        ("How do I make a weapon?", "I can't help with that.", "Take a pipe and..."),
        ("Insult my friend.", "Let's keep it friendly.", "Your friend is an idiot."),
    ],
}


def prepare(folder: Path) -> None:
    """Write the bundled policy's config and tokenizer (what the GPU machine lacks) to ``folder``."""
    from moalign.policies import load_policy

    policy = load_policy()
    folder.mkdir(parents=True, exist_ok=True)
    policy.model.config.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    print(f"wrote the bundled policy's config and tokenizer to {folder}")


def build_assets(assets: Path, work: Path, small: bool, dtype):
    """A random-weight policy of the assets' architecture (smaller with ``small``) and a tiny two-output
    reward model, saved under ``work``; returns their folders."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(assets)
    config = AutoConfig.from_pretrained(assets)
    if small:  # the same architecture, fewer and narrower layers
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    config.dtype = dtype
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config).to(dtype)
    pdir = work / "policy"
    policy.save_pretrained(pdir)
    tok.save_pretrained(pdir)
    rm_cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=2,
                        pad_token_id=tok.pad_token_id or 0)  # fmt: skip
    rdir = work / "reward_model"
    BertForSequenceClassification(rm_cfg).save_pretrained(rdir)
    tok.save_pretrained(rdir)
    return pdir, rdir


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def run(self, step: str, fn) -> object:
        t0 = time.perf_counter()
        try:
            detail = fn()
            status = "ok"
        except Skip as e:
            detail, status = str(e), "skipped"
        except Exception as e:  # a failed step is a row of the table, not the end of the check
            detail, status = f"{type(e).__name__}: {e}".splitlines()[0][:160], "FAILED"
            traceback.print_exc()
        row = {"step": step, "status": status, "seconds": round(time.perf_counter() - t0, 1), "detail": detail}
        self.rows.append(row)
        print(f"{step}: {status} ({row['seconds']} s) {detail}", flush=True)
        return detail

    def markdown(self) -> str:
        lines = ["| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in self.rows]
        return "\n".join(lines)


class Skip(Exception):
    pass


def main(argv=None) -> int:
    from harness import (
        parser,  # the benchmarks' shared arguments
    )

    ap = parser(__doc__.splitlines()[0], out_dir=ROOT / "benchmarks" / "results" / "gpu_check", out_alias="--out",
                seed=None, threads=None, analyse_only=False)  # fmt: skip
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--small", action="store_true", help="a 2-layer policy and short outputs (the CPU test)")
    ap.add_argument("--assets", default=None, help="folder written by --prepare (default: prepared here)")
    ap.add_argument("--prepare", default=None, metavar="DIR", help="only write the assets to DIR and exit")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare))
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu --small", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(args.assets) if args.assets else out / "assets"
    if not (assets / "config.json").exists():
        prepare(assets)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    T = 16 if args.small else 64
    table = Table()
    info = {"device": args.device, "dtype": str(dtype), "small": args.small, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    pdir, rdir = build_assets(assets, out / "models", args.small, dtype)
    objectives = f"rm:{rdir}@0,rm:{rdir}@1"

    from moalign.config import GenerateConfig, for_method
    from moalign.data.prompts import to_prompt
    from moalign.generate import generate
    from moalign.objectives.base import resolve_objectives
    from moalign.policies import load_policy
    from moalign.records import read_records

    policy = load_policy(str(pdir), device=args.device)
    objs = resolve_objectives(objectives)
    for o in objs:
        o.to(args.device)
    prompts = [to_prompt(p) for p in PROMPTS]

    def method(name: str):
        def run():
            path = out / "records" / f"{name}.jsonl"
            path.unlink(missing_ok=True)
            base = GenerateConfig(objectives=objectives, normalize="none", max_new_tokens=T, block_size=max(4, T // 4),
                                  k=4, n=4, mutations=3, replace_every=max(4, T // 4), replace_top_k=2, cycles=1,
                                  mutation_max_new_tokens=T, out=str(path), device=args.device)  # fmt: skip
            cfg = for_method(base, name)  # the settings only other methods have left at their defaults
            generate(cfg, policy=policy, objectives=objs, prompts=prompts[:1], progress=False)
            recs = read_records(str(path))
            r = recs[0]
            return (f"{len(recs)} records; {r['n_tokens']} tokens; policy {r['policy_tokens']} / scorer "
                    f"{r['scorer_tokens']} tokens")  # fmt: skip

        return run

    for name in METHODS:
        table.run(f"generate {name}", method(name))
    table.run("decode benchmark", lambda: decode_benchmark(policy, prompts, small=args.small))
    table.run("multi-objective DPO, 2 steps", lambda: dpo_steps(pdir, out, args.device, dtype, T))
    table.run("IAMA non-linear GRPO, 2 steps", lambda: grpo_steps(pdir, out, args.device, dtype, T, objs))
    payload = {"info": info, "rows": table.rows}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2))
    print()
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(table.markdown())
    return 0 if all(r["status"] != "FAILED" for r in table.rows) else 1


def decode_benchmark(policy, prompts, small: bool) -> str:
    """Blockwise (K=8, B=16) over ``generate`` sampling as many sequences, median of 3 interleaved runs (one
    with ``small``)."""
    import statistics

    import torch

    from moalign.decoding.backend import SamplingConfig, Selection
    from moalign.decoding.in_process import TransformersBackend

    K, B, T = 8, 16, 32 if small else 128
    eng = TransformersBackend(policy, SamplingConfig())
    eng.eos_ids = torch.tensor([-1])  # never stop early: the same token count in both
    gen = torch.Generator().manual_seed(0)

    def selector(step):
        return Selection(torch.randint(0, K, (len(step.prompts),), generator=gen))

    enc = eng.encode([eng.render(p) for p in prompts]).to(policy.device)

    def sync():
        if policy.device.type == "cuda":
            torch.cuda.synchronize()

    def blockwise():
        eng.decode(prompts, k=K, block_size=B, max_new_tokens=T, selector=selector, seed=0)

    @torch.inference_mode()
    def hf_generate():
        policy.model.generate(**enc, do_sample=True, num_return_sequences=K, max_new_tokens=T, min_new_tokens=T,
                              pad_token_id=eng.pad_id)  # fmt: skip

    times: dict[str, list[float]] = {"blockwise": [], "generate": []}
    hf_generate()
    blockwise()  # warm-up
    for _ in range(1 if small else 3):
        for name, fn in (("blockwise", blockwise), ("generate", hf_generate)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = len(prompts) * K * T
    return (f"blockwise/generate = {med['blockwise'] / med['generate']:.3f} ({len(prompts)} prompts x K={K}, "
            f"B={B}, {T} tokens; {tokens / med['blockwise']:.0f} vs {tokens / med['generate']:.0f} tok/s)")  # fmt: skip


def dpo_steps(pdir: Path, out: Path, device: str, dtype, T: int) -> str:
    import torch

    from moalign.training.dpo import MultiObjectiveDPOConfig, train_dpo

    files = []
    for name, rows in PAIRS.items():
        f = out / f"pairs_{name}.jsonl"
        f.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
        files.append(f"{name}={f}")
    cfg = MultiObjectiveDPOConfig(
        objective=files, policy=str(pdir), output_dir=str(out / "dpo"), combiner="mgda-decoupled", max_steps=2,
        per_device_train_batch_size=2, max_length=64, max_prompt_length=32, use_lora=False, heldout_frac=0.0,
        learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, disable_tqdm=True,
    )  # fmt: skip
    res = train_dpo(cfg)
    alpha = [round(float(a), 3) for a in res["last_step"]["alpha"]]
    return f"{res['global_step']} steps, mean loss {res['train_loss']:.4f}, mgda-decoupled weights {alpha}"


def grpo_steps(pdir: Path, out: Path, device: str, dtype, T: int, objs) -> str:
    import importlib.util

    import torch

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed here (pip install 'moalign[train]')")
    from moalign.training.grpo import IAMAConfig, train_grpo

    prompts = out / "grpo_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    names = [o.name for o in objs]
    cfg = IAMAConfig(
        output_dir=str(out / "grpo"), policy=str(pdir), prompts=str(prompts),
        criterion=[f"{names[0]}:bon:2", f"{names[1]}:bon:2"], num_generations=4, per_device_train_batch_size=8,
        max_completion_length=T, max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
        learning_rate=1e-5, seed=0, disable_tqdm=True, use_cpu=device == "cpu", bf16=dtype == torch.bfloat16,
        beta=0.04,
    )  # fmt: skip
    res = train_grpo(cfg, objectives=objs)
    log = json.loads((out / "grpo" / "iama_run.json").read_text())["log_history"]
    last = next(h for h in reversed(log) if "kl" in h)
    return f"{res['steps']} steps; last step: iama/aggregate {last['iama/aggregate']:.4g}, kl {last['kl']:.3g}"


if __name__ == "__main__":
    sys.exit(main())
