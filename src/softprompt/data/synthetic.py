"""A seeded synthetic extractive-QA corpus in SQuAD v1.1 format, for the offline demo and tests.

Each context describes invented people (one by default), each with four attributes (home town, trade,
birth year, instrument) stated in varied sentence templates, in a shuffled order, among filler sentences
that hold no answer. Two tasks share this world and its input format:

* Task A is a people directory. Most questions name the attribute they want ("Where does Mara Quill
  live?", "When was Mara Quill born?"); a question that is just a name ("Mara Quill") asks for the
  person's trade, the directory's default entry.
* Task B asks with the bare name too, but wants the home town. Its inputs look exactly like task A's
  bare-name questions, so a model trained on task A answers them with the trade (near 0 EM), though it
  knows perfectly well how to find a home town when the question says so. A soft prompt can supply the
  missing "where does ... live" without changing a weight: the gap the demo shows prompt tuning close.

Every answer is a span of its context with a correct ``answer_start``: offsets are recorded while the
context is assembled, and the values of one attribute are distinct within a context, so no answer is
ambiguous. All words come from closed lists (``vocabulary_words``), so a small word-level tokenizer covers
the corpus exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_ATTRIBUTE",
    "TASK_B_ATTRIBUTE",
    "Attribute",
    "Task",
    "corpus_texts",
    "generate_intents",
    "generate_split",
    "vocabulary_words",
    "write_squad_json",
]

Attribute = Literal["town", "trade", "year", "instrument"]
Task = Literal["a", "b"]

ATTRIBUTES: tuple[Attribute, ...] = ("town", "trade", "year", "instrument")
# What a bare-name question means in task A, and what it means in task B: they must differ, or task B
# would need no new information.
DEFAULT_ATTRIBUTE: Attribute = "trade"
TASK_B_ATTRIBUTE: Attribute = "town"
# The share of task A questions that are a bare name.
BARE_NAME_SHARE = 0.2

FIRST_NAMES = (
    "Mara", "Tobin", "Elsa", "Corin", "Ilse", "Bram", "Nessa", "Orrin", "Petra", "Quentin",
    "Rhea", "Silas", "Tamsin", "Ulric", "Vera", "Wendel", "Yara", "Anselm", "Brigid", "Cato",
    "Dorit", "Emrys", "Fenna", "Gideon", "Hester", "Ivo", "Jorunn", "Kaspar", "Linnea", "Milo",
)  # fmt: skip
SURNAMES = (
    "Quill", "Ashdown", "Brell", "Corvane", "Dunmore", "Elwood", "Fairlie", "Gorse", "Halloway", "Ingram",
    "Jessop", "Kettering", "Lorne", "Marlowe", "Nettle", "Orpin", "Pellow", "Rooke", "Sallow", "Thorne",
    "Underhill", "Vance", "Wyck", "Yelland", "Abernethy", "Birch", "Cawley", "Dray", "Everly", "Frome",
)  # fmt: skip
TOWNS = (
    "Osterby", "Kelmarsh", "Dunwich", "Farrowmere", "Glenholt", "Harrowgate", "Ivybridge", "Jarrow",
    "Kilbride", "Lowestead", "Marrick", "Northam", "Oakhollow", "Penrith", "Quarley", "Redmoor",
    "Saltash", "Thornbury", "Upwell", "Varden", "Westerly", "Yarcombe", "Ambleside", "Brackwater",
)  # fmt: skip
TRADES = (
    "glazier", "cooper", "tanner", "weaver", "chandler", "farrier", "potter", "mason", "baker",
    "fletcher", "thatcher", "tailor", "miller", "brewer", "saddler", "joiner", "smith", "printer",
    "apothecary", "engraver", "ostler", "innkeeper", "ropemaker", "clockmaker",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1840, 1900))
INSTRUMENTS = (
    "cello", "fiddle", "flute", "harp", "oboe", "lyre", "bassoon", "clarinet", "accordion",
    "trumpet", "harmonium", "dulcimer", "viola", "bagpipe", "zither", "mandolin",
)  # fmt: skip
VALUES: dict[Attribute, tuple[str, ...]] = {
    "town": TOWNS,
    "trade": TRADES,
    "year": YEARS,
    "instrument": INSTRUMENTS,
}

# Statement templates: {n} is the person (full name first, then the first name), {v} the value, {a} the
# article for {v}. Several phrasings per attribute keep the task from being a fixed-offset lookup.
STATEMENTS: dict[Attribute, tuple[str, ...]] = {
    "town": (
        "{n} lives in {v}.",
        "{n} has a house in {v}.",
        "{n} settled in {v} long ago.",
        "Home for {n} is {v}.",
    ),
    "trade": (
        "{n} works as {a} {v}.",
        "{n} earns a living as {a} {v}.",
        "By trade {n} is {a} {v}.",
        "{n} is employed as {a} {v}.",
    ),
    "year": (
        "{n} was born in {v}.",
        "{n} came into the world in {v}.",
        "The year {n} was born was {v}.",
    ),
    "instrument": (
        "{n} plays the {v}.",
        "In the evenings {n} practises the {v}.",
        "{n} owns a fine {v} and plays it well.",
    ),
}

# Sentences without an answer, so the values do not sit at fixed positions; {f} is the first name.
FILLERS = (
    "Everyone knows {f}.",
    "{f} keeps a small garden.",
    "The winters there are long.",
    "{f} has two brothers.",
    "Few people have met {f}.",
    "The market is busy on Sundays.",
)

# Task A question templates: each names its attribute, in words task B never uses.
QUESTIONS: dict[Attribute, tuple[str, ...]] = {
    "town": (
        "Where does {n} live?",
        "In which town does {n} live?",
        "Which town is home to {n}?",
        "Where is the house of {n}?",
    ),
    "trade": (
        "What is the job of {n}?",
        "What does {n} do for a living?",
        "What is the trade of {n}?",
        "What work does {n} do?",
    ),
    "year": (
        "When was {n} born?",
        "In which year was {n} born?",
        "What year was {n} born in?",
    ),
    "instrument": (
        "What does {n} play?",
        "Which instrument does {n} play?",
        "What instrument belongs to {n}?",
    ),
}


@dataclass(frozen=True)
class _Person:
    first: str
    last: str
    values: dict[Attribute, str]

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _people(rng: random.Random, count: int) -> list[_Person]:
    # Distinct first names and distinct values per attribute within a context: the first name is how later
    # sentences refer to a person, and a repeated value would make its answer span ambiguous.
    firsts = rng.sample(FIRST_NAMES, count)
    lasts = rng.sample(SURNAMES, count)
    picks = {attr: rng.sample(VALUES[attr], count) for attr in ATTRIBUTES}
    return [_Person(firsts[i], lasts[i], {attr: picks[attr][i] for attr in ATTRIBUTES}) for i in range(count)]


def _context(rng: random.Random, people: Sequence[_Person]) -> tuple[str, dict[tuple[int, Attribute], int]]:
    """Describe the people; return the text and the character offset of every (person, attribute) value."""
    # (text, offset of the value in it or -1, person, attribute or None for a filler)
    sentences: list[tuple[str, int, int, Attribute | None]] = []
    for i, person in enumerate(people):
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        for k, attr in enumerate(order):
            template = rng.choice(STATEMENTS[attr])
            value = person.values[attr]
            head, tail = template.split("{v}")
            name = person.name if k == 0 else person.first
            prefix = head.format(n=name, a=_article(value))
            sentence = prefix + value + tail.format(n=name)
            if sentence[0].islower():
                sentence = sentence[0].upper() + sentence[1:]
            sentences.append((sentence, len(prefix), i, attr))
        for _ in range(rng.randint(0, 2)):
            filler = rng.choice(FILLERS).format(f=person.first)
            # Never first: the person is introduced by full name before being referred to by first name.
            at = rng.randint(len(sentences) - len(order) + 1, len(sentences))
            sentences.insert(at, (filler, -1, i, None))
    text = ""
    offsets: dict[tuple[int, Attribute], int] = {}
    for sentence, at, i, attr in sentences:
        if text:
            text += " "
        if attr is not None:
            offsets[(i, attr)] = len(text) + at
        text += sentence
    return text, offsets


def generate_split(
    task: Task,
    split: str,
    n_questions: int,
    seed: int = 0,
    *,
    task_b_attribute: Attribute = TASK_B_ATTRIBUTE,
    n_people: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """Generate one split of a task as a SQuAD v1.1 JSON object.

    The same ``(task, split, n_questions, seed)`` always gives the same data; splits are drawn from
    independent streams, so train, dev and test contexts differ.

    Args:
        task: ``"a"`` (questions name the attribute, or are a bare name meaning ``DEFAULT_ATTRIBUTE``) or
            ``"b"`` (a bare name meaning ``task_b_attribute``).
        split: A name such as ``"train"`` or ``"dev"``; it seeds the split's stream and prefixes the ids.
        n_questions: Exactly this many questions are generated.
        seed: The base seed.
        task_b_attribute: The attribute task B asks for; it must differ from ``DEFAULT_ATTRIBUTE``.
        n_people: The fewest and most people described in one context. More than one makes the model bind
            values to names, which a micro model learns far more slowly.

    Returns:
        ``{"version": "1.1", "data": [...]}`` with one article per context.
    """
    if task not in ("a", "b"):
        raise ValueError(f"task must be 'a' or 'b', got {task!r}")
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    if task_b_attribute == DEFAULT_ATTRIBUTE or task_b_attribute not in ATTRIBUTES:
        raise ValueError(f"task_b_attribute must be one of {ATTRIBUTES} other than {DEFAULT_ATTRIBUTE!r}")
    if not 1 <= n_people[0] <= n_people[1] <= min(len(FIRST_NAMES), len(TOWNS)):
        raise ValueError(f"n_people must be (low, high) with 1 <= low <= high, got {n_people}")
    # A string seed is hashed deterministically (random.seed version 2), unlike hash() of a tuple.
    rng = random.Random(f"softprompt-synthetic/{seed}/{task}/{split}")
    articles: list[dict[str, Any]] = []
    made = 0
    while made < n_questions:
        people = _people(rng, rng.randint(*n_people))
        context, offsets = _context(rng, people)
        asks: list[tuple[int, Attribute, bool]] = []  # person, attribute, bare-name question
        if task == "a":
            pairs = [(i, attr) for i in range(len(people)) for attr in ATTRIBUTES]
            for i, attr in rng.sample(pairs, min(len(pairs), rng.randint(2, 3))):
                bare = attr == DEFAULT_ATTRIBUTE and rng.random() < BARE_NAME_SHARE * len(ATTRIBUTES)
                asks.append((i, attr, bare))
        else:
            asked = rng.sample(range(len(people)), min(len(people), rng.randint(1, 2)))
            asks = [(i, task_b_attribute, True) for i in asked]
        qas = []
        for i, attr, bare in asks[: n_questions - made]:
            person = people[i]
            question = person.name if bare else rng.choice(QUESTIONS[attr]).format(n=person.name)
            value = person.values[attr]
            qas.append(
                {
                    "id": f"{task}-{split}-{made:05d}",
                    "question": question,
                    "answers": [{"text": value, "answer_start": offsets[(i, attr)]}],
                }
            )
            made += 1
        articles.append(
            {"title": f"{task}-{split}-{len(articles):05d}", "paragraphs": [{"context": context, "qas": qas}]}
        )
    return {"version": "1.1", "data": articles}


#: Task C's options, listed in every input so that a model trained to extract spans can answer by one.
INTENT_OPTIONS = "town trade year instrument"


def generate_intents(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Task C, a classification task: which attribute does a directory question ask for?

    Each row is ``{"id", "question", "options", "attribute"}``: a question of task A naming its attribute
    ("Where does Mara Quill live?"), the four label words, and its label (``town``, ``trade``, ``year`` or
    ``instrument``; every label is a vocabulary word, so class-label initialisation has an embedding for
    it). The same ``(split, n, seed)`` always gives the same rows.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"softprompt-synthetic/{seed}/c/{split}")
    rows = []
    for k in range(n):
        attribute = rng.choice(ATTRIBUTES)
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        question = rng.choice(QUESTIONS[attribute]).format(n=name)
        rows.append(
            {
                "id": f"c-{split}-{k:05d}",
                "question": question,
                "options": INTENT_OPTIONS,
                "attribute": attribute,
            }
        )
    return rows


def write_squad_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write a SQuAD object as compact, key-ordered JSON (identical bytes for identical data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return path


def vocabulary_words() -> list[str]:
    """Every word the generator can emit, plus the ``question:``/``context:`` markers of the T5 input."""
    words: set[str] = {"question", "context", ":", ".", "?", "a", "an"}
    for values in VALUES.values():
        words.update(values)
    words.update(FIRST_NAMES)
    words.update(SURNAMES)
    for templates in (*STATEMENTS.values(), *QUESTIONS.values(), FILLERS):
        for template in templates:
            text = template.replace("{n}", " ").replace("{v}", " ").replace("{a}", " ").replace("{f}", " ")
            for word in text.replace(".", " ").replace("?", " ").split():
                words.add(word)
                words.add(word[0].upper() + word[1:])
    return sorted(words)


def corpus_texts(data: dict[str, Any]) -> Iterator[str]:
    """The texts of a SQuAD object (contexts, questions, answers), for tokenizer training."""
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            yield paragraph["context"]
            for qa in paragraph["qas"]:
                yield qa["question"]
                for answer in qa["answers"]:
                    yield answer["text"]
