"""Run by tests/training/test_multiprocess.py under ``accelerate launch``: one IAMA step on the tiny policy,
dumping per process what ``IAMATrainer._calculate_rewards`` saw and returned (not a test module)."""

import json
import sys
from pathlib import Path

import torch

from moalign.objectives.base import CallableObjective
from moalign.training.grpo import IAMAConfig, IAMATrainer, train_grpo


def short(prompts, responses):
    return [-len(r) / 10 for r in responses]


def vowels(prompts, responses):
    return [sum(c in "aeiou" for c in r) / 5 for r in responses]


def main() -> None:
    out, policy, prompts = sys.argv[1:4]
    torch.set_num_threads(1)
    dumps = []
    original = IAMATrainer._calculate_rewards

    def spy(self, inputs, prompts_, completions, completion_ids_list):
        result = original(self, inputs, prompts_, completions, completion_ids_list)
        dumps.append({
            "rank": self.accelerator.process_index, "processes": self.accelerator.num_processes,
            "prompts": [p[-1]["content"] for p in prompts_], "completions": [c[-1]["content"] for c in completions],
            "gathered": self.last_raw.tolist(), "returned": result.tolist(),
        })  # fmt: skip
        return result

    IAMATrainer._calculate_rewards = spy
    cfg = IAMAConfig(
        output_dir=out, policy=policy, prompts=prompts, criterion=["short:bon:3", "vowels:bon:2"], aggregate="min",
        num_generations=4, per_device_train_batch_size=6, max_completion_length=6, max_steps=1, logging_steps=1,
        report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    train_grpo(cfg, objectives=[CallableObjective("short", short), CallableObjective("vowels", vowels)])
    rank = dumps[0]["rank"]
    Path(out, f"rewards-rank{rank}.json").write_text(json.dumps(dumps))


if __name__ == "__main__":
    main()
