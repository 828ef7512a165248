"""Prompts and preference pairs from files, HH dialogues and hub datasets."""

from moalign.data.prompts import Prompt, load_prompts, parse_hh_dialogue, to_prompt

__all__ = ["Prompt", "load_prompts", "parse_hh_dialogue", "to_prompt"]
