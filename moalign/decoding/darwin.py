"""Darwin: evolutionary reward-guided decoding (spec: shared/specs/darwin.md; Hung et al., 2024).

Exploration and exploitation are separate operators on the shared engine:

- **mutation** (exploration): the policy (or ``--mutator``) rewrites the instruction into ``n`` variants;
  row j of the group decodes from variant j. Two modes (``--mutation-mode``): ``one`` (default) samples
  ``--mutation-oversample`` x n replies to a few-shot request for *one* rewrite each and keeps the n usable ones
  closest in meaning to the request (:func:`parse_rewrite` says which are usable by their form, :class:`DriftCheck`
  drops those whose sentence embedding strays from the request; only the question of an instruction is
  rewritten, its set-up and the data below it are kept, :func:`split_request`); ``list`` asks once for a numbered list of n
  rewrites (the spec's operator). Slots left without a usable rewrite decode the parent instruction, and the run warns;
- **replacement** (exploitation): every ``m`` tokens all rows are scored against the ORIGINAL instruction;
  the top-k keep their state and every unfinished row outside them continues from a random top-k row's
  response, keeping its own instruction (the engine re-prefills it as its own prompt + the copied tokens).

An archive of instructions (seeded with the original, scored by one plain sample, which is decoded as an
extra row of the first cycle rather than before it) drives ``cycles`` outer iterations: pick a parent uniformly, mutate it, run one replacement cycle, add the two instructions most
often in the top-k when their beam beats the parent (dropping the parent if one was added). The best
response by reward over all cycles is the output; the best-so-far after every cycle is kept in the trace,
so one run reports MC = 1..N.

Ablations are methods of their own: ``sample-replace`` (the original instruction on every row, with
replacement) and ``mutate-bon`` (mutation, no replacement: best-of-n over the mutated instructions).
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moalign.compute import count_reads, scoring_scope
from moalign.configbase import config_field as _f
from moalign.data.prompts import Prompt
from moalign.decoding.backend import RECACHE, Backend, BlockStep, DecodeResult, SamplingConfig, Selection
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import ValueFn, rounded, values_for_active
from moalign.decoding.settings import (
    MethodSettings,
    check_scalarization,
    check_values,
    scalarization_field,
    values_field,
)
from moalign.errors import MoalignError
from moalign.objectives.base import objective_device

#: The default mutation prompt. Slots: ``{instruction}`` (required) and ``{n}``. The spec's prompt is
#: one-shot; the bundled 135M policy copied a one-shot example's rewrites verbatim (rewrites about the
#: example's topic, not the instruction), so the default is zero-shot. Pass a file to override it.
DEFAULT_MUTATION_TEMPLATE = """Rewrite the following instruction in {n} different ways. Keep its meaning; \
you may add detail, remove detail or rephrase it. Answer only with a numbered list of {n} rewritten \
instructions, one per line.

Instruction: {instruction}"""

_NUMBERED = re.compile(r"^\s*(?:\*\*)?\(?(\d{1,2})[.):]\)?(?:\*\*)?\s+(.*\S)\s*$")

#: ``--mutation-mode one``: the request for one rewrite, and worked examples given as earlier turns of the
#: conversation. Zero-shot, the bundled 135M policy answered the instruction in most replies; one example in
#: the same turn (the spec's prompt) made it copy the example. Separate turns on unrelated topics work, and the
#: policy follows their form closely: with every example reply a "Could you ...?" request, its replies are
#: requests too (rather than answers or verbatim copies; measured in benchmarks/darwin_mutation.py), and the
#: example with a set-up (Tom's apples) shows that a rewrite keeps the data the question needs. (A haiku example
#: was copied into a quarter of the rewrites of "What if ..." questions; a "What if" example replaced it.)
REWRITE_ASK = "Rewrite this instruction in other words, without answering it: {instruction}"
#: the set-up kept around a question (:func:`split_request`), shown above the request: without it the policy
#: rewrote questions that depend on it into other ones ("Implement a function to find B_n." -> "a function that
#: returns b multiplied by 2"); with it, 79% of the accepted rewrites of MT-Bench/Vicuna 1-40 were usable by hand
#: against 65% (benchmarks/results/darwin_mutation_handcheck_2.md)
REWRITE_CONTEXT = "Context (keep it as it is): {context}"
REWRITE_EXAMPLES = (
    ("Give me a recipe for banana bread.", "Could you share a recipe I can follow to bake banana bread at home?"),
    ("Write a Python function that reverses a string.",
     "Could you write a Python function that takes a string and returns it reversed?"),
    ("Why do cats purr?", "Could you explain the reasons why cats purr?"),
    ("Tom has 3 apples and buys 5 more. How many apples does he have now?",
     "Could you work out how many apples Tom has if he starts with 3 and then buys 5 more?"),
    ("What if the Moon disappeared?", "Could you describe what would happen on Earth if the Moon vanished?"),
)  # fmt: skip
#: words of the worked examples; a rewrite that has one the instruction lacks copied an example
_EXAMPLE_WORDS = {"banana", "bread", "recipe", "cats", "purr", "reverses", "apples", "tom", "moon", "disappeared"}
#: how a request starts when it is not a question: verbs and request phrases (lower case, first word)
_REQUEST_OPENERS = {
    "write", "create", "compose", "draft", "describe", "explain", "give", "list", "tell", "share", "provide",
    "suggest", "develop", "craft", "design", "imagine", "summarize", "summarise", "outline", "compare", "discuss",
    "generate", "make", "plan", "help", "show", "name", "identify", "analyze", "analyse", "evaluate", "rewrite",
    "translate", "prepare", "produce", "please", "can", "could", "would", "will", "how", "what", "why", "when",
    "where", "which", "who", "is", "are", "do", "does", "should", "pretend", "act", "assume", "consider", "find",
    "calculate", "solve", "implement", "construct", "propose", "recommend", "offer", "detail", "elaborate",
    "brainstorm", "study", "review", "illustrate", "present", "put", "let's", "let", "try", "use", "build",
    "introduce", "speak", "talk", "persuade", "convince", "motivate", "argue", "predict", "estimate", "determine",
    "classify", "correct", "rephrase", "paraphrase", "respond", "reply", "answer", "express", "inspire",
    "encourage", "address", "convert", "define", "note", "state", "compute", "simplify", "prove", "derive",
    "check", "count",
}  # fmt: skip
_ANSWER_OPENERS = ("sure", "certainly", "of course", "here is", "here's", "here are", "i ", "i'm", "i'd", "as an",
                   "yes", "no,", "the answer", "in this", "this instruction", "the instruction", "rewritten")  # fmt: skip
_WH = {"what", "where", "when", "why", "how", "which", "who", "whose", "whom"}
#: first words a statement shares with many instructions, which say nothing about the reply's form
_NOT_REQUEST_WORDS = {"the", "a", "an", "this", "that", "these", "those", "it", "i", "you", "we", "they", "in", "if"}
#: verbs that ask for something to be made or played (a text, a plan, a role): an instruction opening with one is
#: not rewritten by a wh-question that names none of them ("Write a blog post about Hawaii" -> "What is the
#: purpose of a blog post about Hawaii?" asks something else)
_PRODUCE_VERBS = {
    "write", "draft", "craft", "compose", "create", "generate", "design", "develop", "imagine", "pretend", "act",
    "plan", "prepare", "produce", "build", "construct", "edit", "translate", "rewrite", "outline", "summarize",
    "summarise", "brainstorm", "invent", "devise", "formulate", "code", "implement",
}  # fmt: skip
#: number words that carry a problem's data ("one" is left out: it is as often a pronoun)
_NUMBER_WORDS = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "twenty", "hundred", "thousand", "half", "twice", "double", "triple"}  # fmt: skip
#: words that turn a request around; a rewrite of a request that has one keeps one
_NEGATIONS = {"not", "never", "no", "without", "nor", "neither", "cannot", "don't", "doesn't", "didn't", "hadn't",
              "hasn't", "haven't", "isn't", "aren't", "wasn't", "weren't", "won't", "wouldn't", "can't", "couldn't",
              "shouldn't", "instead"}  # fmt: skip
#: how a rewrite may keep "instead of X" ("a small business instead of a chain store" -> "... over a chain store")
_INSTEAD = {"instead", "over", "rather", "than", "versus", "vs"}
#: verbs that set up a role or a scene rather than ask for the reply ("Act as a poet. Write about rain.")
_ROLE_VERBS = {"act", "pretend", "imagine", "assume", "suppose", "picture", "embody", "embrace", "consider"}
#: how an order for the reply opens (a request opener that is not a role, a question word, an auxiliary or a
#: definition: "Let B_n denote ..." defines)
_ORDER_OPENERS = _REQUEST_OPENERS - _ROLE_VERBS - _WH - _NOT_REQUEST_WORDS - {
    "is", "are", "do", "does", "should", "will", "would", "can", "could", "please", "let", "let's"}  # fmt: skip
#: the start of the one-rewrite request, which the policy sometimes echoes before its rewrite
_ECHO = re.compile(r"^\s*[\"*]*rewrite this instruction[^:\n]*:[ \t]*\n*", re.IGNORECASE)
#: how a later sentence of a reply opens when the reply goes on to answer its own question
_STATEMENT_OPENERS = {"it's", "it", "its", "i", "i'm", "i've", "i'd", "this", "that's", "there", "there's", "they",
                      "yes", "no", "because", "well", "when", "the", "a", "an"}  # fmt: skip
_STOPWORDS = {"the", "and", "for", "with", "that", "this", "your", "you", "what", "how", "are", "can", "about",
              "from", "into", "some", "there", "their", "have", "will", "would", "could", "should", "please"}  # fmt: skip


@dataclass
class _Beams(MethodSettings):
    mutations: int = _f(5, "beams per cycle, one per mutated instruction (n)")
    cycles: int = _f(3, "mutation cycles (the best-so-far after each one is kept: MC = 1..N)")
    replace_top_k: int = _f(3, "beams kept at each replacement (top-k); the others copy one of them")
    scalarization: str = scalarization_field()
    values: str = values_field()

    def check(self) -> None:
        super().check()
        self.at_least(1, "mutations", "cycles")
        if not isinstance(self.replace_top_k, int) or not 1 <= self.replace_top_k <= self.mutations:
            self.fail("replace_top_k", f"must be between 1 and mutations ({self.mutations}), got {self.replace_top_k!r}")
        check_scalarization(self)
        check_values(self)


@dataclass
class _Replacement(_Beams):
    replace_every: int = _f(40, "score the beams and replace the weak ones every m tokens")
    recache: str = _f(
        "reprefill",
        "a replaced beam keeps its own instruction and is re-encoded (reprefill), or takes the copied beam's "
        "cache whole (copy: cheaper, continues under the other instruction)",
        choices=RECACHE,
    )

    def check(self) -> None:
        super().check()
        self.at_least(1, "replace_every")
        self.one_of("recache", RECACHE)


@dataclass
class _Mutation(_Beams):
    mutation_mode: str = _f(
        "one",
        "one (sample one rewrite per request, keep the usable ones) or list (one request for a numbered list "
        "of n rewrites)",
        choices=("one", "list"),
    )
    mutation_oversample: int = _f(
        3,
        "mutation mode one: requests per wanted rewrite (the n most faithful usable replies are kept; the first "
        "n with mutation_min_similarity 0)",
    )
    mutation_min_similarity: float = _f(
        0.7,
        "mutation mode one: a rewrite whose sentence embedding (MiniLM) has a cosine similarity below this with "
        "its request (or the request with its set-up) is dropped as drift; 0 turns the check off",
    )
    mutation_template: str | None = _f(
        None,
        "file with the mutation prompt ({instruction} and, in list mode, {n} slots); default: built in (a "
        "few-shot request for one rewrite, or the numbered-list request)",
    )
    mutator: str | None = _f(None, "model that mutates instructions (default: the policy)")
    mutation_temperature: float = _f(0.7, "sampling temperature of the mutator")
    mutation_top_k: int = _f(40, "top-k sampling of the mutator")
    mutation_max_new_tokens: int = _f(160, "token budget of one mutation reply")

    def check(self) -> None:
        super().check()
        self.at_least(1, "mutation_oversample", "mutation_max_new_tokens")
        sim = self.mutation_min_similarity
        if not isinstance(sim, int | float) or not 0.0 <= sim <= 1.0:
            self.fail("mutation_min_similarity", f"must be between 0 and 1, got {sim!r}")
        self.one_of("mutation_mode", ("one", "list"))
        self.template()  # a bad template fails here, before any decoding

    def template(self) -> str | None:
        """The user's mutation prompt, the built-in list prompt, or None (the built-in few-shot request)."""
        if self.mutation_template is None:
            return DEFAULT_MUTATION_TEMPLATE if self.mutation_mode == "list" else None
        p = Path(self.mutation_template)
        if not p.is_file():
            raise MoalignError(f"mutation template not found: {self.mutation_template}")
        text = p.read_text(encoding="utf-8")
        if "{instruction}" not in text:
            raise MoalignError(f"mutation template {self.mutation_template} has no {{instruction}} slot")
        return text


@dataclass
class Darwin(_Mutation, _Replacement):
    """Darwin: ``cycles`` of instruction mutation into ``mutations`` beams, with reward-guided replacement
    every ``replace_every`` tokens (the top ``replace_top_k`` kept); reward = ``scalarization``."""


@dataclass
class SampleReplace(_Replacement):
    """Darwin without mutation: ``mutations`` beams of the original instruction, with replacement."""


@dataclass
class MutateBoN(_Mutation):
    """Darwin without replacement: best-of-n over mutated instructions, archive as in Darwin."""


DarwinArgs = Darwin  # the older name


def mutation_prompt(template: str, instruction: str, n: int) -> str:
    return template.replace("{instruction}", instruction).replace("{n}", str(n))


def parse_mutations(reply: str, n: int) -> list[str]:
    """The numbered items of a mutation reply, in order, at most ``n`` (possibly fewer)."""
    out = []
    for line in reply.splitlines():
        m = _NUMBERED.match(line)
        if m:
            item = m.group(2).strip().strip('"').strip()
            if item:
                out.append(item)
        if len(out) == n:
            break
    return out


def _content_words(text: str) -> set[str]:
    """Lower-case words of 4+ letters outside a few stop words, cut to 5 letters (a crude stem)."""
    words = re.findall(r"[a-z][a-z'-]{3,}", text.lower())
    return {w[:5] for w in words if w not in _STOPWORDS}


def parse_rewrite(reply: str, instruction: str, finished: bool = True) -> tuple[str | None, str]:
    """``(rewrite, "ok")`` when a reply to the one-rewrite request is a usable rewrite of ``instruction``,
    else ``(None, why)``. A reply is usable when it is

    - whole: the row ended (end-of-turn, or a newline after its first line; ``finished``), else "truncated";
    - one instruction: its first line, not a list item ("list"), not a preamble ending in ":" ("preamble"),
      not an opener of an answer such as "Sure", "Here is", "I ..." ("answer");
    - a request by its form: its first sentence is a question (it has "?"), or the reply opens with a request
      (an imperative verb such as "Write", "Explain", a request word such as "Can", "Please", "How to"), else
      "answer" — an answer states things ("The basics of quantum computing are ...", "Where photosynthesis
      takes place is ...", "Awkward. How do you cope? ..."); a question followed by "The answer is" is one too;
    - on the instruction's topic: it shares a content word (or a number) with it ("off-topic"), and has none of the worked
      examples' words that the instruction lacks ("example leak");
    - not much longer than the instruction (3x its words + 10: "too long"), and not the instruction itself
      ("copy");
    - not the request echoed ("Rewrite this instruction ...": "meta"), and not a wh-question in place of an
      instruction to make or play something ("Write a blog post about X" -> "What is the purpose of a blog post
      about X?": "different request"; a question that names a making verb, "How would you write ...", stays);
    - not a question that goes on to answer itself ("What is a language model? It's a program ...": "answer");
    - not missing what the question needs ("premise dropped"): every number of the instruction (digits, number
      words from "two") is kept, and a rewrite of an instruction of several sentences (a set-up, a passage,
      options, then the question) keeps at least 40% of its content words ("David has three sisters. ... How
      many brothers does David have?" -> "How many brothers does David have?" is not a rewrite);
    - not turned around: an instruction with a negation ("not", "never", "without", "instead", ...) keeps one
      ("negation dropped"; "instead of X" may become "over X", "rather than X"), and a counterfactual ("What if
      ...") stays conditional ("if", "had", "were", "would"; "condition dropped");
    - every number as many times as the instruction has it ("premise dropped"), every quoted span ("in the format
      "word, count"") to the letter ("quote dropped").

    A reply that echoes the request's opening ("Rewrite this instruction in other words ...: <rewrite>") is read
    from what follows the colon.
    """
    reply = _ECHO.sub("", reply, count=1)  # "Rewrite this instruction ...: <the rewrite>": the rewrite is what follows
    if not finished:
        return None, "truncated"
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return None, "empty"
    text = lines[0].strip().strip('"').strip("*").strip()
    low = text.lower()
    if _NUMBERED.match(text) or low.startswith(("- ", "* ", "• ")):
        return None, "list"
    if text.endswith(":"):
        return None, "preamble"
    if low.startswith(_ANSWER_OPENERS):
        return None, "answer"
    first = re.sub(r"[^a-z']", "", low.split()[0]) if low.split() else ""
    first_sentence = re.split(r"(?<=[.!?])\s+", text)[0]
    if "?" not in first_sentence:
        statement = first in _WH or first not in _REQUEST_OPENERS
        if first in _WH and low.startswith(("how to ", "what to ")):
            statement = False  # "How to deal with stress." asks for a how-to
        instr_first = re.sub(r"[^a-z']", "", instruction.lower().split()[0]) if instruction.split() else ""
        if statement and not (first == instr_first and first not in _NOT_REQUEST_WORDS and first not in _WH):
            return None, "answer"
    if "the answer" in low.split("?", 1)[-1] and "?" in text:
        return None, "answer"
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", text) if x.strip()]
    if "?" in first_sentence and len(sentences) > 1:
        later = re.sub(r"[^a-z']", "", sentences[1].lower().split()[0])
        if later in _STATEMENT_OPENERS:
            return None, "answer"  # "What is a language model? It's a computer program ...": asks, then answers
    if "instruction" in low and "instruction" not in instruction.lower():
        return None, "meta"  # "Rewrite this instruction with ...": the request echoed, not rewritten
    instr_words = re.findall(r"[a-z']+", instruction.lower())
    if (first in _WH and not low.startswith(("how to ", "what to write")) and instr_words
            and instr_words[0] in _PRODUCE_VERBS and not set(re.findall(r"[a-z']+", low)) & _PRODUCE_VERBS):
        return None, "different request"
    words, instr = _content_words(text), _content_words(instruction)
    if not words & instr and not set(re.findall(r"\d+", text)) & set(re.findall(r"\d+", instruction)):
        return None, "off-topic"  # no content word in common (nor a number, for a problem stated in symbols)
    leak = {w[:5] for w in _EXAMPLE_WORDS} & words - instr
    if leak:
        return None, "example leak"
    if len(text.split()) > 3 * len(instruction.split()) + 10:
        return None, "too long"
    if re.sub(r"\W", "", low) == re.sub(r"\W", "", instruction.lower()):
        return None, "copy"
    # every number as often as the instruction has it ("f(x) = 5x^3 - 2x + 3, find f(2)" -> "find f(x)" keeps
    # one 2 of two), every number word
    data = Counter(re.findall(r"\d+(?:\.\d+)?", instruction)) + Counter(set(instr_words) & _NUMBER_WORDS)
    kept = Counter(re.findall(r"\d+(?:\.\d+)?", text)) + Counter(set(re.findall(r"[a-z']+", low)) & _NUMBER_WORDS)
    n_sentences = len([x for x in re.split(r"(?<=[.!?\n])\s+", instruction.strip()) if x.strip()])
    if data - kept or (n_sentences > 1 and len(words & instr) < 0.4 * len(instr)):
        return None, "premise dropped"  # the numbers, a passage or the set-up that the question needs are gone
    if any(q not in text for q in re.findall(r'"[^"\n]+"', instruction)):
        return None, "quote dropped"  # a quoted format, name or word is the request's data: kept to the letter
    said = set(re.findall(r"[a-z']+", low))
    negations = set(instr_words) & _NEGATIONS
    if negations and not said & _NEGATIONS and not (negations == {"instead"} and said & _INSTEAD):
        return None, "negation dropped"  # "... had never collapsed" -> "... if they vanished", "(not LCA)" -> "(LCA)"
    if instruction.lower().lstrip().startswith("what if") and not said & {"if", "had", "were", "would"}:
        return None, "condition dropped"  # "What if Newton had studied biology?" -> "Why did Newton study biology?"
    return text, "ok"


@dataclass(frozen=True)
class RequestParts:
    """An instruction cut into the sentence the mutator rewrites and what a rewrite keeps verbatim: the
    sentences of its first line before and after that sentence (a set-up, a detail) and the lines below it
    (a passage, a table, code, options). ``join(request)`` puts a rewritten request back in its place."""

    request: str
    before: str = ""
    after: str = ""
    data: str = ""
    sep: str = " "  #: between the set-up and the request ("\n" when the request is a line of its own)

    def join(self, request: str) -> str:
        line = self.sep.join(x for x in (self.before, request) if x)
        line = " ".join(x for x in (line, self.after) if x)
        return f"{line}\n{self.data}" if self.data else line


def split_request(instruction: str) -> RequestParts:
    """The part of ``instruction`` the mutator rewrites, and the rest, kept verbatim: the lines below the first
    (a passage, a table, code, options), and, where the first line has several sentences, every sentence but
    the question (the last one with "?", else the first order for the reply, "Write ...", "Please describe ...",
    else the last one): "David has three sisters. Each of them has one brother. How many brothers does David
    have?" is rewritten as the set-up + a rewrite of its question, "Write a persuasive email ... Please be
    concise." as a rewrite of its first sentence + the constraint. A first line that only sets up, followed by a
    question on the last line, has that question rewritten. Asked to rewrite it all, the bundled 135M policy
    dropped the set-up or the data in most replies (measured in benchmarks/darwin_mutation.py). One sentence:
    the whole instruction."""
    head, sep, tail = instruction.strip().partition("\n")
    data = tail if sep and head.strip() and tail.strip() else ""
    if not data:
        head = instruction.strip() if instruction.strip() else instruction
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", head.strip()) if x.strip()]
    if len(sentences) < 2:
        return RequestParts(head if data else instruction, data=data)
    asks = [i for i, x in enumerate(sentences) if "?" in x]
    orders = [i for i, x in enumerate(sentences) if _asks_for_reply(x)]
    lines = data.split("\n")
    if data and not asks and not orders and "?" in lines[-1] and lines[-1].strip():
        # a set-up of several sentences, then the question on a line of its own ("Benjamin went to a bookstore ...
        # He bought ...\nWhat was the total cost of his purchases?"): the question is what is rewritten
        return RequestParts(lines[-1].strip(), "\n".join([head.strip(), *lines[:-1]]), sep="\n")
    i = asks[-1] if asks else orders[0] if orders else len(sentences) - 1
    return RequestParts(sentences[i], " ".join(sentences[:i]), " ".join(sentences[i + 1 :]), data)


def faithfulness(rewrites: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``rewrites [R, D]`` and ``references [F, D]``, unit-norm sentence embeddings -> ``[R]``: each rewrite's
    highest cosine similarity with a reference (its request alone, and the request with its set-up)."""
    if rewrites.ndim != 2 or references.ndim != 2 or references.shape[0] == 0:
        raise MoalignError(f"faithfulness needs [R, D] rewrites and [F>0, D] references, got "
                           f"{tuple(rewrites.shape)} and {tuple(references.shape)}")  # fmt: skip
    return (rewrites @ references.T).amax(dim=-1)


class DriftCheck:
    """The meaning-drift check of one mutation call. A rewrite that passes :func:`parse_rewrite` can still ask
    something else ("How can I increase my productivity while working from home?" -> "Could you work on projects
    while working remotely?"); in 65 hand-labelled accepted rewrites, 8 of the 11 whose MiniLM cosine
    similarity to their request was below 0.7 were not usable against 5 of the other 54
    (benchmarks/results/darwin_mutation_handcheck_3.md; on fresh replies it did not measurably raise the share of
    usable beams, but it ranks them: the n most similar are kept). Group i's references are its request and, where the
    instruction has a set-up, the set-up + request (a rewrite that folds the set-up in is not drift). Each text
    is encoded once per group; ``cost[i]`` holds what the encoder read for group i (scorer tokens and FLOPs)."""

    def __init__(self, parts: Sequence[RequestParts], threshold: float, device: str | torch.device = "cpu"):
        self.threshold, self.device = threshold, device
        self.refs = [[p.request] + ([f"{p.before} {p.request}"] if p.before else []) for p in parts]
        self.cost = [DecodeResult.holder() for _ in parts]
        self._refs: dict[int, torch.Tensor] = {}
        self._sim: dict[tuple[int, str], float] = {}

    def _encode(self, texts: list[str], groups: list[int]) -> torch.Tensor:
        from moalign.objectives import embeddings

        with count_reads(len(texts)) as reads:
            emb = embeddings.encode(texts, device=self.device)
        for j, (g, t, f) in enumerate(zip(groups, reads.tokens(), reads.flops())):
            c = self.cost[g]
            c.scorer_tokens, c.scorer_flops = c.scorer_tokens + t, c.scorer_flops + f
            for name, n in reads.by_name(j).items():
                c.scorer_reads[name] = c.scorer_reads.get(name, 0) + n
        return emb

    def similarity(self, items: Sequence[tuple[int, str]]) -> list[float]:
        """Cosine similarity of each (group, rewrite) with the group's closest reference, encoding only the
        texts not seen before, in one batch."""
        new = list(dict.fromkeys(it for it in items if it not in self._sim))
        for i in sorted({i for i, _ in new} - set(self._refs)):
            self._refs[i] = self._encode(self.refs[i], [i] * len(self.refs[i]))
        if new:
            emb = self._encode([t for _, t in new], [i for i, _ in new])
            for (i, t), e in zip(new, emb):
                self._sim[(i, t)] = float(faithfulness(e[None], self._refs[i])[0])
        return [self._sim[it] for it in items]


def _asks_for_reply(sentence: str) -> bool:
    """Whether a sentence without "?" is an order for the reply ("Write a persuasive email ...", "Please
    describe ..."), not a role or a scene ("Act as ...", "Please assume the role ...") nor a statement."""
    words = [re.sub(r"[^a-z']", "", w) for w in sentence.lower().split()[:2]]
    if words and words[0] == "please":
        words = words[1:]
    return bool(words) and words[0] in _ORDER_OPENERS


def rewrite_request(instruction: str, template: str | None = None, context: str = "") -> Prompt:
    """The one-rewrite request: ``template`` (a user file) as one user turn, or the built-in few-shot turns.
    ``context`` (the set-up kept around the question, :func:`split_request`) is shown above the request."""
    if template is not None:
        return Prompt(({"role": "user", "content": mutation_prompt(template, instruction, 1)},))
    msgs: list[dict] = []
    for a, b in REWRITE_EXAMPLES:
        msgs += [{"role": "user", "content": REWRITE_ASK.replace("{instruction}", a)},
                 {"role": "assistant", "content": b}]  # fmt: skip
    ask = REWRITE_ASK.replace("{instruction}", instruction)
    if context:
        ask = f"{REWRITE_CONTEXT.replace('{context}', context)}\n\n{ask}"
    msgs.append({"role": "user", "content": ask})
    return Prompt(tuple(msgs))


def rewrite_decided(reply: str, instruction: str) -> bool:
    """Whether more tokens cannot change what :func:`parse_rewrite` makes of a reply: its first line is whole
    (a newline follows it), or it is already a list item, an answer's opener, a first sentence that states, or
    too long."""
    reply = _ECHO.sub("", reply, count=1)
    if "\n" in reply.strip():
        return True
    text = reply.strip().strip('"').strip("*").strip()
    if len(text.split()) > 3 * len(instruction.split()) + 10:
        return True
    low = text.lower()
    if len(text) > 3 and (bool(_NUMBERED.match(text + " x")) or low.startswith(_ANSWER_OPENERS)):
        return True
    m = re.search(r"[.!?]\s+\S", text)  # the first sentence is whole: its form is settled
    return m is not None and parse_rewrite(text[: m.start() + 1], instruction)[1] == "answer"


def _stop_when_decided(instructions: list[str], n: int | None, stopped: set[tuple[int, int]]):
    """A selector for one-rewrite replies to ``instructions`` (one group each): a row stops once
    :func:`rewrite_decided` (mostly: once its first line is whole); a group's remaining rows stop once it holds
    ``n`` distinct usable rewrites (recorded in ``stopped`` as (group, row): those rows are cut, not replies).
    ``n=None``: no group is cut (every reply is wanted, e.g. to keep the n most faithful)."""

    def select(step: BlockStep) -> Selection:
        P, K = step.done.shape
        finish = torch.zeros(P, K, dtype=torch.bool)
        for p, (i, row) in enumerate(zip(step.prompt_indices, step.texts)):
            ok: set[str] = set()
            for k, t in enumerate(row):
                if (i, k) in stopped:
                    continue
                if bool(step.done[p, k]) or rewrite_decided(t, instructions[i]):
                    finish[p, k] = True
                    text, why = parse_rewrite(t, instructions[i])
                    if why == "ok":
                        ok.add(text)
            if n is not None and len(ok) >= n:
                for k in range(K):
                    if not finish[p, k] and not bool(step.done[p, k]):
                        finish[p, k] = True
                        stopped.add((i, k))
        return Selection(torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K), finish=finish)

    return select


def mutation_complete(reply: str, n: int) -> bool:
    """True once ``reply`` holds ``n`` numbered items and something follows the n-th one's line (so that
    line is whole; replies reach selectors stripped, so a trailing newline alone is not seen)."""
    lines = reply.splitlines()
    count = 0
    for i, line in enumerate(lines):
        m = _NUMBERED.match(line)
        if m and m.group(2).strip().strip('"').strip():
            count += 1
            if count == n:
                return i < len(lines) - 1
    return False


def _stop_when_complete(n: int):
    """A selector for the mutator: rows stop once their reply holds ``n`` complete numbered items."""

    def select(step: BlockStep) -> Selection:
        P, K = step.done.shape
        finish = torch.tensor([[mutation_complete(t, n) for t in row] for row in step.texts])
        return Selection(
            torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K), finish=finish
        )

    return select


def with_instruction(prompt: Prompt, instruction: str) -> Prompt:
    """The conversation with its last user turn replaced by ``instruction``."""
    msgs = list(prompt.messages)
    msgs[-1] = {"role": "user", "content": instruction}
    return Prompt(tuple(msgs), id=prompt.id)


def replacement_parents(
    scores: torch.Tensor, done: torch.Tensor, top_k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Darwin's exploitation step for one group: ``scores [K]``, ``done [K]`` ->
    (``parents [K]``: the top-k rows and finished rows keep their own state, every other row points at a
    random top-k row; ``top [top_k]``: the top-k rows, best first)."""
    K = scores.shape[0]
    top = torch.topk(scores, top_k).indices
    parents = torch.arange(K)
    keep = torch.zeros(K, dtype=torch.bool)
    keep[top] = True
    for j in range(K):
        if not keep[j] and not bool(done[j]):
            parents[j] = top[int(torch.randint(top_k, (1,), generator=generator))]
    return parents, top


class _ReplacementSelector:
    """The per-cycle selector: replacement every block (if ``replace``), argmax of the reward at the end.
    Keeps the top-k counts and the final values of every row for the archive. The first ``reserved`` rows
    of a group (the seed sample, decoded alongside the first cycle) take no part in the search: they are
    never replaced, never copied and never counted."""

    def __init__(
        self,
        value_fn: ValueFn,
        reward_fn: ValueFn,
        scal: Scalarization,
        top_k: int,
        replace: bool,
        P: int,
        K: int,
        reserved: int = 0,
    ):
        self.value_fn, self.reward_fn, self.scal = value_fn, reward_fn, scal
        self.top_k, self.replace = top_k, replace
        self.reserved = reserved
        self.counts = torch.zeros(P, K - reserved, dtype=torch.long)
        self.final_values: torch.Tensor | None = None
        self.final_scores: torch.Tensor | None = None

    def __call__(self, step: BlockStep) -> Selection:
        # partial responses are scored by the value function; complete ones by the reward itself
        v, active = values_for_active(step, self.reward_fn if step.final else self.value_fn)
        s = self.scal(v)  # [P, K]
        P, K = s.shape
        r = self.reserved
        parents = torch.arange(K).expand(P, K).clone()
        info: list[dict | None] = [None] * P
        for p in active.nonzero().flatten().tolist():
            beams = s[p, r:]
            top = torch.topk(beams, self.top_k).indices
            self.counts[p, top] += 1
            if step.final or not self.replace:
                continue
            par, _ = replacement_parents(beams, step.done[p, r:].cpu(), self.top_k, step.rng)
            parents[p, r:] = par + r
            info[p] = {
                "scores": rounded(beams),
                "top_k": top.tolist(),
                "parents": par.tolist(),
                "replaced": int((par != torch.arange(K - r)).sum()),
            }
        if step.final:
            self.final_values, self.final_scores = v, s
        return Selection(s[:, r:].argmax(dim=1) + r, info, parents)


class DarwinDecoder:
    """Darwin and its ablations on the engine; see the module docstring."""

    n_outputs = 1

    def __init__(self, ctx: MethodContext, args: DarwinArgs, *, mutate: bool, replace: bool):
        self.ctx, self.args, self.mutate, self.replace = ctx, args, mutate, replace
        self.engine: Backend = ctx.engine
        self.value_fn = ctx.value_fn()
        self.reward = ctx.reward_fn()
        self.scal = ctx.scalarization()
        self.max_new_tokens = ctx.cfg.max_new_tokens
        self.template = args.template()
        #: mutation outcomes of the run so far (generate writes them to the run's meta)
        self.report = {"mutations": 0, "rewrites_wanted": 0, "rewrites_usable": 0, "failed": 0}
        self.mutator: Backend | None = None
        if mutate:
            sampling = SamplingConfig(temperature=args.mutation_temperature, top_k=args.mutation_top_k)
            if args.mutator:
                from moalign.decoding.in_process import TransformersBackend
                from moalign.policies import load_policy

                policy = load_policy(args.mutator, device=str(ctx.policy.device))
                self.mutator = TransformersBackend(policy, sampling, system_prompt=None)
            else:  # the policy itself, on the run's backend (in-process or server)
                self.mutator = ctx.engine_with(sampling)
        #: where the drift check's sentence encoder runs: --objective-device, else the policy's device
        spec = getattr(ctx.cfg, "objective_device", None)
        policy_device = getattr(ctx.policy, "device", None)
        self.encoder_device = objective_device(spec, policy_device) if spec else torch.device(policy_device or "cpu")

    # -------------------------------------------------------------------------------------------- parts
    def _mutate(self, parents: list[Prompt], seed: int) -> tuple[list[list[str]], list[dict], list[DecodeResult]]:
        """n instructions per parent (slots without a usable rewrite decode the parent) and a trace entry per
        parent (the replies, what was made of them, how many rewrites were usable, the mutator's tokens) and
        the mutation's compute per parent (the mutator's decoding and the drift check's reads)."""
        if self.args.mutation_mode == "list":
            return self._mutate_list(parents, seed)
        n, m = self.args.mutations, self.args.mutations * self.args.mutation_oversample
        whole = [p.messages[-1]["content"] for p in parents]
        split = [split_request(w) for w in whole]  # the set-up and the data around the question are kept
        bases = [parts.request for parts in split]
        # a rewrite is about as long as its request: a budget of 16 tokens + ~3 per word of the longest
        budget = min(self.args.mutation_max_new_tokens, 16 + 3 * max(len(b.split()) for b in bases))
        stopped: set[tuple[int, int]] = set()
        drift = DriftCheck(split, self.args.mutation_min_similarity, self.encoder_device) \
            if self.args.mutation_min_similarity > 0 else None  # fmt: skip
        res = self.mutator.decode(
            [rewrite_request(pt.request, self.template, pt.before) for pt in split], k=m, block_size=8, max_new_tokens=budget,
            seed=seed, selector=_stop_when_decided(bases, n if drift is None else None, stopped), keep_all=True,
        )  # fmt: skip
        out, info = [], []
        for i, (parts, r) in enumerate(zip(split, res)):
            base = parts.request
            verdicts = [(None, "enough rewrites") if (i, k) in stopped else
                        parse_rewrite(row.response, base, finished=row.finished) for k, row in enumerate(r.rows)]  # fmt: skip
            similarity: list[float | None] = [None] * len(verdicts)
            if drift is not None:
                ok = [k for k, (_, why) in enumerate(verdicts) if why == "ok"]
                for k, sim in zip(ok, drift.similarity([(i, verdicts[k][0]) for k in ok])):
                    similarity[k] = round(sim, 4)
                    if sim < drift.threshold:
                        verdicts[k] = (None, "drift")
            # the first n distinct usable rewrites; with the drift check, the n most faithful (every reply decoded)
            order = sorted(range(len(verdicts)), key=lambda k: -(similarity[k] or 0.0)) if drift is not None \
                else range(len(verdicts))  # fmt: skip
            kept: list[str] = []
            for k in order:
                text, why = verdicts[k]
                if why == "ok" and text not in kept and len(kept) < n:
                    kept.append(text)
            out.append([parts.join(t) for t in kept] + [whole[i]] * (n - len(kept)))
            info.append({"mode": "one", "replies": [row.response for row in r.rows],
                         "verdicts": [why for _, why in verdicts], "parsed": len(kept),
                         "complete": len(kept) == n, "forward_tokens": r.forward_tokens, "similarity": similarity,
                         "scorer_tokens": drift.cost[i].scorer_tokens if drift is not None else 0})  # fmt: skip
            if drift is not None:
                r.add_compute(drift.cost[i])
            info[-1].update(policy_flops=r.policy_flops, scorer_flops=r.scorer_flops)
        return out, info, res

    def _mutate_list(
        self, parents: list[Prompt], seed: int
    ) -> tuple[list[list[str]], list[dict], list[DecodeResult]]:
        """``--mutation-mode list``: one reply per parent, a numbered list of n rewrites."""
        n = self.args.mutations
        asks = [
            Prompt(
                ({"role": "user", "content": mutation_prompt(self.template, p.messages[-1]["content"], n)},)
            )
            for p in parents
        ]
        res = self.mutator.decode(
            asks, k=1, block_size=16, max_new_tokens=self.args.mutation_max_new_tokens, seed=seed,
            selector=_stop_when_complete(n),
        )  # fmt: skip
        out, info = [], []
        for parent, r in zip(parents, res):
            items = parse_mutations(r.response, n)
            base = parent.messages[-1]["content"]
            out.append(items + [base] * (n - len(items)))
            info.append({"mode": "list", "reply": r.response, "parsed": len(items), "complete": len(items) == n,
                         "forward_tokens": r.forward_tokens, "policy_flops": r.policy_flops,
                         "scorer_flops": r.scorer_flops})  # fmt: skip
        return out, info, res

    def _warn_failed(self, info: list[dict | None]) -> None:
        """Count the mutation slots left to the parent instruction; warn when a prompt's mutation failed."""
        n = self.args.mutations
        done = [i for i in info if i is not None]
        failed = [i for i in done if i["parsed"] < n]
        self.report["mutations"] += len(done)
        self.report["rewrites_wanted"] += n * len(done)
        self.report["rewrites_usable"] += sum(i["parsed"] for i in done)
        self.report["failed"] += len(failed)
        if failed:
            missing = sum(n - i["parsed"] for i in failed)
            warnings.warn(
                f"darwin: the mutation of {len(failed)} of {len(done)} instruction(s) gave fewer than {n} usable "
                f"rewrites ({missing} beam(s) decode the parent instruction instead; see the records' trace)",
                stacklevel=2,
            )

    # --------------------------------------------------------------------------------------------- main
    def __call__(
        self, prompts: Sequence[Prompt], *, seed: int, prompt_indices: Sequence[int]
    ) -> list[list[DecodeResult]]:
        with scoring_scope():  # one scope for the scorers' caches over every cycle and the mutations
            return self._search(prompts, seed, prompt_indices)

    def _search(self, prompts, seed: int, prompt_indices) -> list[list[DecodeResult]]:
        a, T = self.args, self.max_new_tokens
        prompts = list(prompts)
        P, n = len(prompts), a.mutations

        def sub(*parts) -> int:
            return zlib.crc32(":".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF

        rng = torch.Generator().manual_seed(sub("archive"))
        # the archive starts with the original instruction, scored by one plain sample (the first best);
        # that sample is decoded as an extra row of the first cycle (it needs nothing the cycle produces, and
        # the cycle needs nothing from it until its end), so it costs no extra sequential decoding
        archive: list[list[tuple[Prompt, float]]] = [[(p, float("nan"))] for p in prompts]
        best: list[DecodeResult | None] = [None] * P
        best_r = [float("-inf")] * P
        best_cycle = [0] * P
        # compute over every cycle: decoding, scoring (replacements and each cycle's final scoring), mutation
        spent = [DecodeResult.holder(p) for p in prompts]
        traces: list[list[dict]] = [[] for _ in range(P)]

        for c in range(1, a.cycles + 1):
            seed_row = 1 if c == 1 else 0
            pick = [int(torch.randint(len(archive[i]), (1,), generator=rng)) for i in range(P)]
            parents = [archive[i][pick[i]] for i in range(P)]
            mut_info: list[dict | None] = [None] * P
            if self.mutate:
                instr, mut_info, mut_cost = self._mutate([pp for pp, _ in parents], seed=sub("mutate", c))
                for i in range(P):
                    spent[i].add_compute(mut_cost[i])
                self._warn_failed(mut_info)
                beam_prompts = [[with_instruction(parents[i][0], t) for t in instr[i]] for i in range(P)]
            else:
                instr = [[pp.messages[-1]["content"]] * n for pp, _ in parents]
                beam_prompts = [[pp] * n for pp, _ in parents]
            row_prompts = [[prompts[i]] * seed_row + beam_prompts[i] for i in range(P)]
            sel = _ReplacementSelector(self.value_fn, self.reward, self.scal, a.replace_top_k, self.replace, P,
                                       n + seed_row, reserved=seed_row)  # fmt: skip
            block = a.replace_every if self.replace else T
            res = self.engine.decode(
                prompts, k=n + seed_row, block_size=block, max_new_tokens=T, selector=sel, seed=sub("cycle", c),
                keep_all=True, prompt_indices=prompt_indices, row_prompts=row_prompts, recache=a.recache,
                hidden=self.ctx.hidden,
            )  # fmt: skip
            scores = sel.final_scores
            for i, r in enumerate(res):
                if seed_row:
                    seed_r = float(scores[i, 0])
                    archive[i] = [(prompts[i], seed_r)]
                    parents[i] = archive[i][0]
                    best[i], best_r[i] = r.rows[0], seed_r
                    traces[i].append({"cycle": 0, "seed_sample": True, "reward": round(seed_r, 4),
                                      "values": rounded(sel.final_values[i, 0]), "response": r.rows[0].response,
                                      "forward_tokens": 0, "decoded_with_cycle": 1})  # fmt: skip
                s = scores[i, seed_row:]
                rows = r.rows[seed_row:]
                j = int(s.argmax())
                # archive: the two instructions most often in the top-k, when their beam beats the parent
                order = sorted(range(n), key=lambda b: (-int(sel.counts[i, b]), -float(s[b]), b))
                added = []
                parent_prompt, parent_r = parents[i]
                if self.mutate:
                    known = {pp.messages[-1]["content"] for pp, _ in archive[i]}
                    for b in order[:2]:
                        if float(s[b]) > parent_r and instr[i][b] not in known:
                            archive[i].append((beam_prompts[i][b], float(s[b])))
                            known.add(instr[i][b])
                            added.append(b)
                    if added and len(archive[i]) > 1:
                        archive[i] = [e for e in archive[i] if e[0] is not parent_prompt]
                if float(s[j]) > best_r[i]:
                    best[i], best_r[i], best_cycle[i] = rows[j], float(s[j]), c
                spent[i].add_compute(r)
                entry = {
                    "cycle": c,
                    "parent": parent_prompt.messages[-1]["content"],
                    "parent_reward": round(parent_r, 4),
                    "instructions": instr[i],
                    "mutation": mut_info[i],
                    "replacements": [b for b in r.trace if "replaced" in b],
                    "n_replaced": sum(b.get("replaced", 0) for b in r.trace),
                    "top_k_counts": sel.counts[i].tolist(),
                    "beam_rewards": rounded(s),
                    "best_beam": j,
                    "cycle_best_reward": round(float(s[j]), 4),
                    "archive_added": added,
                    "archive": [[pp.messages[-1]["content"], round(rw, 4)] for pp, rw in archive[i]],
                    "best_so_far": {"cycle": best_cycle[i], "reward": round(best_r[i], 4),
                                    "response": best[i].response},
                    "forward_tokens": r.forward_tokens,  # this cycle's decoding (the seed row's too in cycle 1)
                    "scorer_tokens": r.scorer_tokens,  # this cycle's scoring (replacements and the final one)
                    "policy_flops": r.policy_flops,
                    "scorer_flops": r.scorer_flops,
                }  # fmt: skip
                traces[i].append(entry)
        out = []
        for i in range(P):
            b = best[i]
            out.append(
                [
                    DecodeResult(
                        prompt=prompts[i], response=b.response, token_ids=b.token_ids, finished=b.finished,
                        trace=traces[i], token_logprobs=b.token_logprobs, row_prompt=b.row_prompt,
                        policy_flops=0.0,
                    )
                ]
            )  # fmt: skip
            out[-1][0].add_compute(spent[i])
        return out


def _builder(mutate: bool, replace: bool):
    def build(ctx: MethodContext, args: _Beams) -> DarwinDecoder:
        full = args if isinstance(args, Darwin) else Darwin(**asdict(args))  # an ablation: Darwin's other defaults
        return DarwinDecoder(ctx, full, mutate=mutate, replace=replace)

    return build


register_method(MethodSpec(
    "darwin",
    "evolutionary decoding: `--cycles` of instruction mutation into `--mutations` beams with reward-guided "
    "replacement every `--replace-every` tokens (top `--replace-top-k` kept); reward = `--scalarization`",
    Darwin, _builder(mutate=True, replace=True),
))  # fmt: skip
register_method(MethodSpec(
    "sample-replace", "Darwin without mutation: `--mutations` beams of the original instruction, with replacement",
    SampleReplace, _builder(mutate=False, replace=True),
))  # fmt: skip
register_method(MethodSpec(
    "mutate-bon", "Darwin without replacement: best-of-n over mutated instructions, archive as in Darwin",
    MutateBoN, _builder(mutate=True, replace=False),
))  # fmt: skip
