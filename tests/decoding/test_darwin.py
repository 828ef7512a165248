"""Darwin: the pure parts (parsing, replacement), the search loop on a tiny policy, its CLI and a real run."""

from __future__ import annotations

import json

import pytest
import torch

from moalign.cli import main
from moalign.config import GenerateConfig, for_method
from moalign.data.prompts import to_prompt
from moalign.decoding.darwin import DarwinArgs, replacement_parents, with_instruction
from moalign.decoding.rewrites import mutation_prompt, parse_mutations
from moalign.errors import MoalignError
from moalign.generate import generate
from moalign.objectives.base import CallableObjective
from moalign.records import read_records

PROMPTS = [to_prompt(p, id=f"p{i}") for i, p in enumerate(["Say hi", "Name a fruit", "Count to three"])]


# ------------------------------------------------------------------------------------------- pure parts
def test_parse_mutations_numbered_forms_and_limits():
    reply = "Sure! Here they are:\n1. First one\n2) Second one\n**3.** Third\n  4: Fourth \n- not numbered\n5. Fifth\n6. x"
    assert parse_mutations(reply, 5) == ["First one", "Second one", "Third", "Fourth", "Fifth"]
    assert parse_mutations(reply, 2) == ["First one", "Second one"]
    assert parse_mutations("no list at all", 3) == []
    assert parse_mutations('1. "quoted"\n2.   \n3. ok', 5) == ["quoted", "ok"]


def test_mutation_prompt_and_instruction_swap():
    assert mutation_prompt("Do {n}: {instruction}", "X", 4) == "Do 4: X"
    p = to_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}], id="7")  # fmt: skip
    q = with_instruction(p, "C2")
    assert [m["content"] for m in q.messages] == ["a", "b", "C2"] and q.id == "7"


def test_replacement_parents_keeps_top_k_and_finished_rows():
    scores = torch.tensor([0.1, 0.9, 0.5, -1.0, 0.7])
    done = torch.tensor([False, False, False, True, False])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        parents, top = replacement_parents(scores, done, 2, g)
        assert top.tolist() == [1, 4]
        assert parents[1] == 1 and parents[4] == 4  # the top-k keep their own state
        assert parents[3] == 3  # a finished row is never overwritten
        assert int(parents[0]) in (1, 4) and int(parents[2]) in (1, 4)
        seen.add((int(parents[0]), int(parents[2])))
    assert len(seen) > 1  # the copied top-k row is drawn at random


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(mutations=0), "^Darwin: mutations must be >= 1, got 0$"),
        (dict(replace_every=0), "^Darwin: replace_every must be >= 1"),
        (dict(cycles=0), "^Darwin: cycles must be >= 1"),
        (dict(replace_top_k=0), "^Darwin: replace_top_k must be between 1 and mutations"),
        (dict(mutations=3, replace_top_k=4), r"^Darwin: replace_top_k must be between 1 and mutations \(3\), got 4"),
        (dict(mutation_template="/nonexistent/template.txt"), "not found"),
    ],
)
def test_bad_settings_name_the_parameter(kw, msg):
    with pytest.raises(MoalignError, match=msg):
        DarwinArgs(**kw).validate()


def test_template_without_instruction_slot(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("Rewrite this {n} times.")
    with pytest.raises(MoalignError, match=r"\{instruction\}"):
        DarwinArgs(mutation_template=str(t)).validate()


# ------------------------------------------------------------------------------------ the search loop
def _objs(seen: list | None = None):
    def vowels(p, r):
        if seen is not None:
            seen.extend(p)
        return [sum(c in "aeiou" for c in x) / 10 for x in r]

    return [
        CallableObjective("vowels", vowels),
        CallableObjective("short", lambda p, r: [-len(x) / 50 for x in r]),
    ]


def _cfg(tmp_path, method, **kw):
    base = dict(method=method, out=str(tmp_path / f"{method}.jsonl"), max_new_tokens=12, normalize="none",
                batch_size=2, seed=3, mutations=3, replace_every=4, replace_top_k=2, cycles=2,
                mutation_max_new_tokens=24, scalarization="worst-case")  # fmt: skip
    base.update(kw)
    return for_method(GenerateConfig(**{k: v for k, v in base.items() if k != "method"}), method)


def test_darwin_trace_archive_and_reward_on_original(tmp_path, tiny_policy, one_thread):
    seen: list[str] = []
    cfg = _cfg(tmp_path, "darwin")
    recs = generate(cfg, policy=tiny_policy, objectives=_objs(seen), prompts=PROMPTS, progress=False)
    assert len(recs) == len(PROMPTS)
    # the objectives only ever see the ORIGINAL instructions, never a mutated one
    assert set(seen) == {p.text for p in PROMPTS}
    for rec in recs:
        tr = rec["trace"]
        assert [e["cycle"] for e in tr] == [0, 1, 2]
        best = [tr[0]["reward"]] + [e["best_so_far"]["reward"] for e in tr[1:]]
        assert best == sorted(best)  # best-so-far never gets worse
        final = tr[-1]["best_so_far"]
        assert rec["response"] == final["response"]
        for e in tr[1:]:
            assert len(e["instructions"]) == 3
            assert e["mutation"]["parsed"] <= 3
            assert e["cycle_best_reward"] == max(e["beam_rewards"])
            assert sum(e["top_k_counts"]) == 2 * (len(e["replacements"]) + 1)
            assert e["n_replaced"] == sum(b["replaced"] for b in e["replacements"])
            assert e["archive"]  # never empty
        # the output's reward is recomputed from the record's own scores (worst case of the raw scores)
        assert min(rec["scores"].values()) == pytest.approx(final["reward"], abs=1e-3)
        assert rec["policy_tokens"] == sum(e["policy_tokens"] + (e.get("mutation") or {}).get(
            "policy_tokens", 0) for e in tr)  # fmt: skip


def test_darwin_is_seeded_and_resumes_identically(tmp_path, tiny_policy, one_thread):
    a = generate(_cfg(tmp_path / "a", "darwin"), policy=tiny_policy, objectives=_objs(), prompts=PROMPTS,
                 progress=False)  # fmt: skip
    # interrupted after the first batch (2 prompts), then resumed
    cfg = _cfg(tmp_path / "b", "darwin")
    generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS[:2], progress=False)
    generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    b = read_records(cfg.out)
    keys = ("record_id", "response", "scores", "trace", "policy_tokens")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    c = generate(_cfg(tmp_path / "c", "darwin", seed=4), policy=tiny_policy, objectives=_objs(),
                 prompts=PROMPTS, progress=False)  # fmt: skip
    assert [r["trace"] for r in a] != [r["trace"] for r in c]


def test_ablations(tmp_path, tiny_policy, one_thread):
    sr = generate(_cfg(tmp_path, "sample-replace"), policy=tiny_policy, objectives=_objs(), prompts=PROMPTS,
                  progress=False)  # fmt: skip
    for rec in sr:
        for e in rec["trace"][1:]:
            assert e["mutation"] is None and set(e["instructions"]) == {rec["prompt"]}
            assert e["replacements"]  # replacement happened every 4 tokens
    mb = generate(_cfg(tmp_path, "mutate-bon"), policy=tiny_policy, objectives=_objs(), prompts=PROMPTS,
                  progress=False)  # fmt: skip
    for rec in mb:
        for e in rec["trace"][1:]:
            assert e["mutation"] is not None and e["replacements"] == [] and e["n_replaced"] == 0


def test_cli_darwin_and_bad_flag(tmp_path, tiny_policy_dir, capsys):
    out = tmp_path / "d.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p.text}) for p in PROMPTS[:1]) + "\n")
    base = ["generate", "--method", "darwin", "--policy", str(tiny_policy_dir), "--prompts", str(prompts),
            "--objectives", "concise", "--normalize", "none", "--max-new-tokens", "6", "--mutations", "2",
            "--replace-every", "3", "--replace-top-k", "1", "--cycles", "1", "--mutation-max-new-tokens", "8"]  # fmt: skip
    assert main(base + ["--out", str(out)]) == 0
    assert len(read_records(out)) == 1
    assert main(base[:-2] + ["--replace-top-k", "5", "--out", str(tmp_path / "e.jsonl")]) == 2
    assert "--replace-top-k" in capsys.readouterr().err


@pytest.mark.real
def test_darwin_real_policy(tmp_path, real_policy, shared_data):
    from moalign.data.prompts import load_prompts
    from moalign.decoding.rewrites import parse_rewrite, split_request
    from moalign.objectives.base import resolve_objectives

    prompts = load_prompts(str(shared_data / "mt-bench-questions.jsonl"), limit=2)
    cfg = GenerateConfig(method="darwin", mutations=3, replace_every=8, replace_top_k=2, cycles=1,
                         max_new_tokens=24, mutation_max_new_tokens=96, batch_size=2,
                         scalarization="worst-case", out=str(tmp_path / "d.jsonl"))  # fmt: skip
    recs = generate(cfg, policy=real_policy, objectives=resolve_objectives("helpful,harmless"),
                    prompts=prompts, progress=False)  # fmt: skip
    for rec in recs:
        assert rec["response"].strip()
        cyc = rec["trace"][1]
        assert cyc["cycle_best_reward"] == max(cyc["beam_rewards"])
        # at least one instruction parsed from the real policy's reply or an honest fallback to copies
        assert 0 <= cyc["mutation"]["parsed"] <= 3 and len(cyc["instructions"]) == 3
        assert rec["policy_tokens"] > 0
        # the drift check: accepted rewrites clear the threshold, dropped ones do not, and the beams take the
        # most faithful distinct ones, best first
        m = cyc["mutation"]
        sims = {}
        for reply, verdict, sim in zip(m["replies"], m["verdicts"], m["similarity"]):
            assert (sim is None) == (verdict not in ("ok", "drift"))
            if verdict == "ok":
                assert sim >= 0.7
                sims[parse_rewrite(reply, split_request(cyc["parent"]).request)[0]] = sim
            elif verdict == "drift":
                assert sim < 0.7
        best = sorted(sims, key=lambda t: -sims[t])[: m["parsed"]]
        assert m["parsed"] == min(3, len(sims))
        assert all(t in ins for t, ins in zip(best, cyc["instructions"]))
        assert (m["scorer_tokens"] > 0) == any(s is not None for s in m["similarity"])


@pytest.mark.parametrize(
    "reply, finished, verdict",
    [
        ("What is the main difference between Python and JavaScript?", True, "ok"),
        ("Explain how Python and JavaScript differ as programming languages.", True, "ok"),
        ("Compare Python and JavaScript for me.\nThat is my rewrite.", True, "ok"),  # first line only
        ("What is the main difference between Python and", False, "truncated"),  # cut by the budget
        ("1. Preheat the oven", True, "list"),  # a numbered answer
        ("Here is a rewritten version:", True, "preamble"),
        ("Sure! Python is interpreted.", True, "answer"),
        ("Python and JavaScript are both popular languages with different uses.", True, "answer"),  # a statement
        ("What is the reason that cats purr?", True, "off-topic"),  # the worked example, not this instruction
        ("Compare Python and JavaScript as if on the Moon.", True, "example leak"),
        ("What are the main differences between Python and JavaScript programming languages?", True, "copy"),
        ("How do " + "Python and JavaScript differ " * 12 + "?", True, "too long"),
        ("", True, "empty"),
        ("Where Python and JavaScript differ is in their typing.", True, "answer"),  # a wh-word opens a statement
        ("Awkward. How do Python and JavaScript differ?", True, "answer"),  # the first sentence states
        ("How do Python and JavaScript differ? The answer is typing.", True, "answer"),  # asks, then answers
        ("How to compare Python and JavaScript programming languages.", True, "ok"),  # a how-to request
    ],
)
def test_parse_rewrite_tells_rewrites_from_answers(reply, finished, verdict):
    from moalign.decoding.rewrites import parse_rewrite

    instruction = "What are the main differences between Python and JavaScript programming languages?"
    text, why = parse_rewrite(reply, instruction, finished=finished)
    assert why == verdict
    assert (text is not None) == (verdict == "ok")
    if verdict == "ok":
        assert "\n" not in text


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Write a post about a recent trip to Hawaii, highlighting its culture.", "ok"),
        ("Can you write a blog post on your trip to Hawaii and its sights?", "ok"),  # a question that still asks for it
        ("How would you write a blog post about a trip to Hawaii?", "ok"),  # names the making verb
        ("What is the purpose of a blog post about a recent trip to Hawaii?", "different request"),
        ("Why do people write blog posts about Hawaii?", "ok"),  # names 'write': left to the other checks
        ("Rewrite this instruction as a short blog post about Hawaii.", "meta"),  # the request echoed
    ],
)
def test_parse_rewrite_keeps_the_kind_of_request(reply, verdict):
    from moalign.decoding.rewrites import parse_rewrite

    instruction = "Write a blog post about a recent trip to Hawaii that highlights cultural experiences."
    assert parse_rewrite(reply, instruction)[1] == verdict
    # the same wh-question rewrites an instruction that asks a question or to explain
    assert parse_rewrite("What makes Hawaii's culture worth a visit?", "Explain what makes Hawaii's culture special.")[1] == "ok"


@pytest.mark.parametrize(
    "instruction, reply, verdict",
    [
        ("David has three sisters. Each of them has one brother. How many brothers does David have?",
         "How many brothers does David have?", "premise dropped"),  # the set-up the question needs is gone
        ("David has three sisters. Each of them has one brother. How many brothers does David have?",
         "If David has three sisters, each with one brother, how many brothers does David have?", "ok"),
        ("Given that f(x) = 4x^3 - 9x - 14, find the value of f(2).", "What is the value of f(2)?", "premise dropped"),
        ("Given that f(x) = 4x^3 - 9x - 14, find the value of f(2).", "Compute f(2) for f(x) = 4x^3 - 9x - 14.", "ok"),
        ("Explain what a language model is to a customer.", "What is a language model? It's a program that writes.",
         "answer"),  # asks, then answers its own question
        ("Explain what a language model is to a customer.", "What is a language model? Explain it simply to a customer.",
         "ok"),
        ("How would you introduce yourself as a knight at a royal banquet?",
         "Introduce yourself as a knight at a royal banquet.", "ok"),  # an imperative request
        ("What if the Maya civilization had never mysteriously collapsed?",
         "Could you explain what would happen to the Maya civilization if they vanished suddenly?", "negation dropped"),
        ("What if the Maya civilization had never mysteriously collapsed?",
         "Could you describe what would happen to the Maya civilization if they never collapsed?", "ok"),
        ("Write a function to find the highest common ancestor (not LCA) of two nodes in a binary tree.",
         "Could you write a function that finds the highest common ancestor (LCA) of two nodes in a binary tree?",
         "negation dropped"),
        ("What if Isaac Newton had focused on biology instead of physics?",
         "Could you explain why Isaac Newton focused on biology instead of physics?", "condition dropped"),
        ("What if Isaac Newton had focused on biology instead of physics?",
         "Could you describe how science would differ if Isaac Newton had studied biology instead of physics?", "ok"),
        # "instead of X" may become "over X" / "rather than X"; a plain negation may not
        ("Why might someone shop at a small business instead of a chain store?",
         "Could you explain why someone might shop at a small business over a chain store?", "ok"),
        ("Why might someone shop at a small business instead of a chain store?",
         "Could you explain why someone might shop at a small business rather than a chain store?", "ok"),
        ("Why might someone shop at a small business instead of a chain store?",
         "Could you explain why someone might shop at a small business?", "negation dropped"),
        ("Why don't penguins fly?", "Could you explain why penguins fly rather than swim?", "negation dropped"),
        # each number as often as the instruction has it; quoted formats and words kept to the letter
        ("Given that f(x) = 5x^3 - 2x + 3, find the value of f(2).",
         "Could you find the value of f(x) when given f(x) = 5x^3 - 2x + 3?", "premise dropped"),
        ("Given that f(x) = 5x^3 - 2x + 3, find the value of f(2).",
         "Could you calculate f(2) for f(x) = 5x^3 - 2x + 3?", "ok"),
        ('Output in the format of "character, book, year", one book per line.',
         'Could you output each book on its own line in the format "character, book, year"?', "ok"),
        ('Output in the format of "character, book, year", one book per line.',
         'Could you output it in the format of "character, year, book" with one book per line?', "quote dropped"),
    ],
)
def test_parse_rewrite_keeps_what_the_question_needs(instruction, reply, verdict):
    from moalign.decoding.rewrites import parse_rewrite

    assert parse_rewrite(reply, instruction)[1] == verdict


@pytest.mark.parametrize(
    "instruction, parts",
    [
        ("Explain tides.", ("Explain tides.", "", "", "")),
        ("Extract the dates.\nJan 3: rain.\nFeb 9: snow.", ("Extract the dates.", "", "", "Jan 3: rain.\nFeb 9: snow.")),
        ("Sort this list:\n\n3, 1, 2\n", ("Sort this list:", "", "", "\n3, 1, 2")),  # inner lines kept as they are
        ("\nWhy is the sky blue?\n", ("\nWhy is the sky blue?\n", "", "", "")),  # one sentence: left alone
        ("David has three sisters. Each of them has one brother. How many brothers does David have?",
         ("How many brothers does David have?", "David has three sisters. Each of them has one brother.", "", "")),
        ("How many atoms are in a grain of salt? Try to explain your answer. Go step by step.",
         ("How many atoms are in a grain of salt?", "", "Try to explain your answer. Go step by step.", "")),
        ("Act as a poet. Write about rain.\nStyle: haiku", ("Write about rain.", "Act as a poet.", "", "Style: haiku")),
        # no question: the first order for the reply, not a trailing constraint, a role or a definition
        ("Write a persuasive email to my friend. Use strong arguments. Please be concise.",
         ("Write a persuasive email to my friend.", "", "Use strong arguments. Please be concise.", "")),
        ("Please assume the role of a translator. Please correct my text.",
         ("Please correct my text.", "Please assume the role of a translator.", "", "")),
        ("Let B_n be the number of full binary trees with n vertices. Implement a function to find B_n.",
         ("Implement a function to find B_n.", "Let B_n be the number of full binary trees with n vertices.", "", "")),
        # a set-up line, then the question on a line of its own
        ("Tom buys 3 books. Each costs $5.\nWhat did he pay?",
         ("What did he pay?", "Tom buys 3 books. Each costs $5.", "", "", "\n")),
    ],
)
def test_split_request_rewrites_the_question_and_keeps_the_rest(instruction, parts):
    from moalign.decoding.rewrites import RequestParts, split_request

    got = split_request(instruction)
    assert got == RequestParts(*parts)
    if got.before or got.after or got.data:
        assert got.join(got.request) == instruction.strip()  # nothing lost, nothing added
        new = got.join("Could you ask it again?")
        assert "Could you ask it again?" in new and got.request not in new
        for kept in (got.before, got.after, got.data):
            assert kept in new


def test_worked_examples_are_requests_the_rule_accepts():
    """Every worked example's reply is itself a usable rewrite of its instruction by the rule (the examples
    show the policy what the rule wants), and the rule calls a reply that copies one a leak elsewhere."""
    from moalign.decoding.rewrites import _EXAMPLE_WORDS, REWRITE_EXAMPLES, _content_words, parse_rewrite

    for instruction, reply in REWRITE_EXAMPLES:
        assert parse_rewrite(reply, instruction) == (reply, "ok"), instruction
    for _, reply in REWRITE_EXAMPLES:
        # each example has a word of its own in the leak list, so a copy of it is caught on another topic
        assert {w[:5] for w in _EXAMPLE_WORDS} & _content_words(reply), reply
        assert parse_rewrite(reply, "Explain how tides work in the Atlantic.")[0] is None


def test_rewrite_request_is_few_shot_or_the_users_template(tmp_path):
    from moalign.decoding.rewrites import REWRITE_EXAMPLES, rewrite_request

    p = rewrite_request("Explain tides.")
    roles = [m["role"] for m in p.messages]
    assert roles == ["user", "assistant"] * len(REWRITE_EXAMPLES) + ["user"]
    assert p.messages[-1]["content"].endswith("Explain tides.")
    ctx = rewrite_request("How many brothers does David have?", context="David has three sisters.")
    assert ctx.messages[:-1] == p.messages[:-1]  # the same worked examples
    last = ctx.messages[-1]["content"]
    assert "David has three sisters." in last and last.endswith("How many brothers does David have?")
    own = rewrite_request("Explain tides.", "Say it again: {instruction}")
    assert [m["content"] for m in own.messages] == ["Say it again: Explain tides."]


def test_mutation_mode_one_keeps_usable_rewrites_and_counts_the_rest(tiny_policy, one_thread):
    """The operator keeps at most n distinct usable replies, fills the rest with the parent instruction, and
    says so in its trace, its report and a warning (the tiny random policy writes no usable rewrite)."""
    from moalign.decoding.darwin import DarwinDecoder
    from moalign.decoding.in_process import TransformersBackend
    from moalign.decoding.registry import MethodContext
    from moalign.decoding.values import ObjectiveScorer

    cfg = GenerateConfig(method="darwin", mutations=3, mutation_oversample=2, mutation_max_new_tokens=12,
                         normalize="none")  # fmt: skip
    dec = DarwinDecoder(MethodContext(cfg, tiny_policy, TransformersBackend(tiny_policy),
                                      ObjectiveScorer(_objs())), cfg.method_args(), mutate=True, replace=True)  # fmt: skip
    instr, info, _ = dec._mutate(PROMPTS[:2], seed=0)
    for p, got, i in zip(PROMPTS[:2], instr, info):
        assert len(got) == 3 and i["mode"] == "one"
        assert len(i["replies"]) == len(i["verdicts"]) == 6  # oversampled 2x
        assert i["parsed"] == sum(t != p.messages[-1]["content"] for t in got)
        assert i["policy_tokens"] > 0
        # the drift check reads only rewrites the rule accepted (and then their references): its count says so
        assert len(i["similarity"]) == 6
        assert (i["scorer_tokens"] > 0) == any(s is not None for s in i["similarity"])
    with pytest.warns(UserWarning, match="gave fewer than 3 usable rewrites"):
        dec._warn_failed(info)
    assert dec.report["mutations"] == 2 and dec.report["rewrites_wanted"] == 6
    assert dec.report["failed"] == sum(i["parsed"] < 3 for i in info)


def test_faithfulness_is_the_best_cosine_over_the_references():
    from moalign.decoding.rewrites import faithfulness

    g = torch.Generator().manual_seed(0)
    rw = torch.nn.functional.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=-1)
    refs = torch.nn.functional.normalize(torch.randn(2, 7, generator=g, dtype=torch.float64), dim=-1)
    want = [max(sum(float(a) * float(b) for a, b in zip(r, f)) for f in refs) for r in rw]  # plain loops
    assert faithfulness(rw, refs).tolist() == pytest.approx(want, abs=1e-12)
    assert faithfulness(rw, refs[:1]).tolist() == pytest.approx((rw @ refs[0]).tolist(), abs=1e-12)
    with pytest.raises(MoalignError, match="references"):
        faithfulness(rw, refs[:0])


def test_drift_check_on_minilm_rejects_another_request_and_reads_each_text_once():
    """The real encoder: a paraphrase passes, a rewrite that asks something else does not, a rewrite that folds
    the set-up in is compared with the set-up + request; the encoder's reads are counted once per text."""
    from moalign.decoding.rewrites import DriftCheck, split_request
    from moalign.objectives.embeddings import token_counts

    parts = [split_request("How can I increase my productivity while working from home?"),
             split_request("A binary tree is full if every vertex has zero or two children. Let B_n be the number "
                           "of full binary trees with n vertices. Implement a function to find B_n.")]  # fmt: skip
    from moalign.compute import scoring_scope

    check = DriftCheck(parts, 0.7)
    items = [(0, "Could you suggest a way to boost my productivity while working from home?"),
             (0, "Could you work on projects while working remotely?"),
             (1, "Could you write a function that counts the full binary trees with n vertices?")]
    with scoring_scope(reuse=False):  # an empty cache, as in a search
        sims = check.similarity(items)
    assert sims[0] > 0.85 and sims[1] < 0.6 and sims[2] >= 0.7  # 0.95 and 0.48 on the hand-checked replies
    alone = DriftCheck([split_request("Implement a function to find B_n.")], 0.7)
    assert alone.similarity([(0, items[2][1])])[0] < sims[2]  # the set-up is what makes it faithful
    read = [sum(token_counts(check.refs[0])) + sum(token_counts([items[0][1], items[1][1]])),
            sum(token_counts(check.refs[1])) + token_counts([items[2][1]])[0]]
    assert len(check.refs[1]) == 2 and [c.scorer_tokens for c in check.cost] == read
    check.similarity(items[::-1])
    assert [c.scorer_tokens for c in check.cost] == read  # seen texts are not read again
    from moalign.objectives.embeddings import encoder_cost

    assert [c.scorer_flops for c in check.cost] == [2 * encoder_cost().params * t for t in read]


def test_rewrite_selector_cuts_a_group_at_n_usable_rewrites_unless_told_not_to():
    from moalign.decoding.backend import BlockStep
    from moalign.decoding.rewrites import _stop_when_decided

    instr = "How can I increase my productivity while working from home?"
    rows = ["Could you suggest a way to boost my productivity while working from home?\nThat",
            "Sure! Start early.", "Could you tell me how to be more productive when I work from home?\nThat",
            "Could you"]  # fmt: skip
    step = BlockStep(prompts=[to_prompt(instr)], prompt_indices=[0], texts=[rows],
                     token_ids=torch.zeros(1, 4, 1, dtype=torch.long), done=torch.zeros(1, 4, dtype=torch.bool),
                     block_index=0, final=False, rng=torch.Generator().manual_seed(0))  # fmt: skip
    for n, cut in ((2, True), (3, False), (None, False)):
        stopped: set = set()
        sel = _stop_when_decided([instr], n, stopped)(step)
        assert sel.finish[0].tolist() == [True, True, True, cut]  # rows 0-2 are decided; row 3 is still growing
        assert stopped == ({(0, 3)} if cut else set())


def test_mutation_min_similarity_is_checked():
    with pytest.raises(MoalignError, match="^Darwin: mutation_min_similarity must be between 0 and 1"):
        DarwinArgs(mutation_min_similarity=1.5).validate()
    DarwinArgs(mutation_min_similarity=0.0).validate()


def test_mutation_complete_waits_for_the_whole_last_item():
    from moalign.decoding.rewrites import mutation_complete

    assert not mutation_complete("1. a\n2. b", 2)  # the second item may still be growing
    assert not mutation_complete("1. a\n2. b\n", 2)  # a bare trailing newline does not count
    assert mutation_complete("1. a\n2. b\nThat's it", 2)
    assert mutation_complete("1. a\n2. b\n3. c", 2)
    assert not mutation_complete("Sure!\n1. a", 2)


def test_selector_finish_ends_rows_early(tiny_policy):
    """Selection.finish ends rows like an end-of-turn token: they stop growing and count as finished."""
    from moalign.decoding.backend import BlockStep, SamplingConfig, Selection
    from moalign.decoding.in_process import TransformersBackend

    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))

    def stop_row0(step: BlockStep) -> Selection:
        P, K = step.done.shape
        finish = torch.zeros(P, K, dtype=torch.bool)
        finish[:, 0] = True
        return Selection(
            torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K), finish=finish
        )

    res = eng.decode(
        PROMPTS[:1], k=2, block_size=3, max_new_tokens=9, selector=stop_row0, seed=0, keep_all=True
    )
    assert res[0].rows[0].finished and len(res[0].rows[0].token_ids) <= 3
    r1 = res[0].rows[1]
    assert r1.finished or len(r1.token_ids) == 9


def test_replacement_selector_scores_partial_beams_with_values_and_final_beams_with_the_reward():
    from moalign.decoding.backend import BlockStep
    from moalign.decoding.darwin import _ReplacementSelector
    from moalign.decoding.scalarize import Scalarization

    values = lambda step: torch.tensor([[[0.0], [0.0], [1.0], [0.5]]])  # noqa: E731  (value estimates)
    reward = lambda step: torch.tensor([[[9.0], [3.0], [1.0], [2.0]]])  # noqa: E731  (the reward itself)
    sel = _ReplacementSelector(values, reward, Scalarization("weights", (1.0,)), 2, True, 1, 4, reserved=1)

    def step(final: bool) -> BlockStep:
        return BlockStep(prompts=[to_prompt("q")], prompt_indices=[0], texts=[["a", "b", "c", "d"]],
                         token_ids=torch.zeros(1, 4, 1, dtype=torch.long), done=torch.zeros(1, 4, dtype=torch.bool),
                         block_index=0, final=final, rng=torch.Generator().manual_seed(0))  # fmt: skip

    mid = sel(step(False))
    assert mid.parents[0, 0] == 0  # the reserved seed row is never replaced
    assert set(mid.parents[0, 1:].tolist()) <= {2, 3} and mid.parents[0, 2] == 2 and mid.parents[0, 3] == 3
    end = sel(step(True))
    assert int(end.chosen[0]) == 1  # best beam by the reward (row 0, the seed row, is not a beam)
    # top-2 by value mid-way (beams 1, 2), by reward at the end (beams 0, 2)
    assert sel.counts[0].tolist() == [1, 1, 2]
