"""Prompts and preference pairs from files, HH dialogues and hub datasets."""

from moalign.data.pairs import PreferencePair, load_pairs, split_pairs
from moalign.data.prompts import Prompt, load_prompts, parse_hh_dialogue, to_prompt

__all__ = ["PreferencePair", "Prompt", "load_pairs", "load_prompts", "parse_hh_dialogue", "split_pairs", "to_prompt"]
