"""RULER-style synthetic long-context tasks over real text haystacks, generated from a fixed seed.

Tasks (after RULER, Hsieh et al. 2024; needles inserted between sentences of Austen novels):
- ``passkey``: one 5-digit pass key hidden in the text; answer = the key.
- ``multikey``: four "special magic number for <word>" needles (one asked, three distractors);
  answer = the asked word's number.
- ``multivalue``: four numbers for the same word; answer = all four (score = fraction recalled).
- ``vartrack``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of 4 hops scattered in the text;
  answer = every variable name holding the value (score = fraction recalled).

Every prompt is SmolLM2's chat template around one user turn (instruction, haystack, question)
followed by a short answer prefix on the assistant's side ("The pass key is "), so a greedy
continuation of a few tokens holds the answer. The length of a sample is its token count with the
given tokenizer (within a few tokens of the target).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
MAX_NEW_TOKENS = {"passkey": 8, "multikey": 8, "multivalue": 30, "vartrack": 24}
# Needle words for the multi-key / multi-value tasks (concrete nouns, none frequent in Austen).
WORDS = (
    "lantern", "harbor", "violin", "glacier", "compass", "meadow", "pepper", "falcon", "marble",
    "orchard", "saddle", "thunder", "velvet", "walnut", "anchor", "beacon", "cactus", "dolphin",
    "ember", "fjord", "granite", "hammock", "igloo", "jasmine", "kettle", "lobster", "mosaic",
    "nectar", "oyster", "pigeon", "quartz", "rocket", "saffron", "tulip", "umbrella", "walrus",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class TaskSample:
    task: str
    target_tokens: int
    index: int
    seed: int
    prompt: str  # the full text fed to the model (chat template + answer prefix)
    answers: list[str]  # strings the output must contain
    question: str
    depths: list[float] = field(default_factory=list)  # relative positions of the needles
    max_new_tokens: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("prompt")
        return d


def _contains(output: str, answer: str) -> bool:
    """Whole-token containment: '12345' does not match inside '123456', 'ABCDE' not in 'ABCDEF'."""
    if answer.isdigit():
        pat = rf"(?<!\d){re.escape(answer)}(?!\d)"
    else:
        pat = rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])"
    return re.search(pat, output) is not None


def score(sample: TaskSample, output: str) -> float:
    """Exact match of the expected string(s) in the output; the fraction recalled when a task has
    several answers (multivalue, vartrack), else 0 or 1."""
    if not sample.answers:
        raise ValueError(f"sample {sample.task}/{sample.index} has no answers")
    return sum(_contains(output, a) for a in sample.answers) / len(sample.answers)


def _number(rng: random.Random, used: set) -> str:
    while True:
        s = str(rng.randint(10000, 99999))
        if s not in used:
            used.add(s)
            return s


def _varname(rng: random.Random, used: set) -> str:
    while True:
        s = "".join(rng.choice(_LETTERS) for _ in range(5))
        if s not in used:
            used.add(s)
            return s


def _spec(task: str, rng: random.Random):
    """(instruction, needles, question, answer_prefix, answers) for one sample."""
    used: set = set()
    if task == "passkey":
        key = _number(rng, used)
        needles = [f"The pass key is {key}. Remember it. {key} is the pass key."]
        return ("Read the text and find the pass key.", needles, "What is the pass key?",
                "The pass key is ", [key])
    if task == "multikey":
        words = rng.sample(WORDS, 4)
        nums = [_number(rng, used) for _ in words]
        needles = [f"One of the special magic numbers for {w} is: {n}." for w, n in zip(words, nums)]
        ask = rng.randrange(4)
        return ("Read the text and find the special magic numbers.", needles,
                f"What is the special magic number for {words[ask]}?",
                f"The special magic number for {words[ask]} is ", [nums[ask]])
    if task == "multivalue":
        word = rng.choice(WORDS)
        nums = [_number(rng, used) for _ in range(4)]
        needles = [f"One of the special magic numbers for {word} is: {n}." for n in nums]
        return ("Read the text and find the special magic numbers.", needles,
                f"What are all the special magic numbers for {word}?",
                f"The special magic numbers for {word} are ", nums)
    if task == "vartrack":
        value = _number(rng, used)
        names = [_varname(rng, used) for _ in range(5)]
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return ("Read the text and track the variable assignments.", needles,
                f"Find all variables that are assigned the value {value}.",
                f"The variables assigned the value {value} are: ", names)
    raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")


def _sentence_cuts(text: str) -> list[int]:
    """Character offsets right after a sentence end ('. ', '! ', '? ' or a paragraph break)."""
    return [m.end() for m in re.finditer(r"[.!?][\"']?\s+", text)]


def make_sample(task: str, target_tokens: int, index: int, *, tokenizer, haystack: str,
                chat: Callable[[str], str], seed: int = 0) -> TaskSample:
    """One sample of ``task`` with about ``target_tokens`` prompt tokens.

    ``tokenizer`` encodes/decodes (HF tokenizer); ``chat(user_text)`` wraps one user turn in the
    model's chat template ending at the assistant's turn; ``haystack`` is the source text (a
    random paragraph-aligned slice of it is used, chosen by ``seed``/``task``/``index``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if not isinstance(target_tokens, int) or target_tokens < 256:
        raise ValueError(f"target_tokens must be an int >= 256, got {target_tokens!r}")
    if len(haystack) < target_tokens * 8:
        raise ValueError(f"haystack of {len(haystack)} chars is too short for {target_tokens} tokens")
    rng = random.Random(f"{seed}/{task}/{target_tokens}/{index}")
    instruction, needles, question, prefix, answers = _spec(task, rng)

    def build(hay: str, depths: Sequence[float]) -> str:
        cuts = _sentence_cuts(hay) or [len(hay)]
        pos = sorted({min(cuts, key=lambda c: abs(c - d * len(hay))) for d in depths})
        if len(pos) < len(depths):  # two needles on one cut: spread them over distinct cuts
            pos = sorted(rng.sample(cuts, len(depths))) if len(cuts) >= len(depths) else [len(hay)] * len(depths)
        parts, last = [], 0
        for p, needle in zip(pos, needles):
            parts.append(hay[last:p].rstrip() + "\n\n" + needle + "\n\n")
            last = p
        parts.append(hay[last:].lstrip())
        body = "".join(parts).strip()
        return chat(f"{instruction}\n\n{body}\n\n{question}") + prefix

    depths = sorted(rng.uniform(0.1, 0.9) for _ in needles)
    overhead = len(tokenizer(build("", [0.0] * len(needles)), add_special_tokens=False).input_ids)
    budget = target_tokens - overhead
    if budget < 64:
        raise ValueError(f"target_tokens {target_tokens} leaves no room for a haystack ({overhead} overhead)")
    # paragraph-aligned start inside the haystack
    starts = [m.end() for m in re.finditer(r"\n\n", haystack[: len(haystack) - budget * 8])]
    start = rng.choice(starts) if starts else 0
    ids = tokenizer(haystack[start:start + budget * 8], add_special_tokens=False).input_ids[:budget]
    hay = tokenizer.decode(ids)
    # trim to whole sentences, then correct the length once (the token count of the assembled
    # prompt differs a little from the sum of the parts)
    cuts = _sentence_cuts(hay)
    if cuts:
        hay = hay[: cuts[-1]]
    prompt = build(hay, depths)
    return TaskSample(task=task, target_tokens=target_tokens, index=index, seed=seed, prompt=prompt,
                      answers=list(answers), question=question, depths=[round(d, 4) for d in depths],
                      max_new_tokens=MAX_NEW_TOKENS[task])


def make_samples(tasks: Sequence[str], counts: dict, *, tokenizer, haystack: str, chat, seed: int = 0) -> list[TaskSample]:
    """``counts`` maps target length -> samples per task. Order: length, task, index."""
    out = []
    for length in sorted(counts):
        for task in tasks:
            for i in range(int(counts[length])):
                out.append(make_sample(task, int(length), i, tokenizer=tokenizer, haystack=haystack, chat=chat, seed=seed))
    return out
