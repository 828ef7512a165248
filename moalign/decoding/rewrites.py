"""Darwin's rewrite operator on English text: the mutation requests (few-shot, or a numbered list), what a reply
is made into (:func:`parse_rewrite`'s verdicts, :func:`parse_mutations`), the split of an instruction into its
request and what surrounds it (:func:`split_request`), and the drift check on sentence embeddings
(:class:`DriftCheck`). The word lists are tuned to what the bundled 135M policy writes; the search itself is
:mod:`moalign.decoding.darwin`."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moalign.compute import count_reads
from moalign.data.prompts import Prompt
from moalign.decoding.backend import BlockStep, DecodeResult, Selection
from moalign.errors import MoalignError

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
#: against 65% (a hand check of 50 replies; in the git history of benchmarks/results/)
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
        groups = sorted({i for i, _ in new} - set(self._refs))
        if groups:  # every new group's references in one batch
            texts = [(i, t) for i in groups for t in self.refs[i]]
            emb = self._encode([t for _, t in texts], [i for i, _ in texts])
            for i in groups:
                self._refs[i] = emb[[j for j, (g, _) in enumerate(texts) if g == i]]
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
