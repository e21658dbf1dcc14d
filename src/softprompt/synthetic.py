"""A seeded synthetic extractive-QA corpus in SQuAD v1.1 format, for the offline demo and tests.

Each context describes two to four invented people, each with four attributes (home town, trade, birth
year, instrument) stated in varied sentence templates and in a shuffled order. Two tasks share the contexts:

* Task A asks about any attribute with a question that names it ("Where does Mara Quill live?").
* Task B asks with the bare name ("Mara Quill") and always wants one fixed attribute (the home town by
  default). The question no longer says which attribute is meant, so a model trained on task A cannot tell;
  a soft prompt can supply the missing word. That gap is what the demo shows prompt tuning close.

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
    "TASK_B_ATTRIBUTE",
    "Attribute",
    "Task",
    "corpus_texts",
    "generate_split",
    "vocabulary_words",
    "write_squad_json",
]

Attribute = Literal["town", "trade", "year", "instrument"]
Task = Literal["a", "b"]

ATTRIBUTES: tuple[Attribute, ...] = ("town", "trade", "year", "instrument")
TASK_B_ATTRIBUTE: Attribute = "town"

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
    "cello", "fiddle", "flute", "harp", "oboe", "lute", "bassoon", "clarinet", "accordion",
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
    return [
        _Person(firsts[i], lasts[i], {attr: picks[attr][i] for attr in ATTRIBUTES}) for i in range(count)
    ]


def _context(rng: random.Random, people: Sequence[_Person]) -> tuple[str, dict[tuple[int, Attribute], int]]:
    """Describe the people; return the text and the character offset of every (person, attribute) value."""
    sentences: list[tuple[str, int, int, Attribute]] = []  # text, offset of value in it, person, attribute
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
    text = ""
    offsets: dict[tuple[int, Attribute], int] = {}
    for sentence, at, i, attr in sentences:
        if text:
            text += " "
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
    n_people: tuple[int, int] = (2, 4),
) -> dict[str, Any]:
    """Generate one split of a task as a SQuAD v1.1 JSON object.

    The same ``(task, split, n_questions, seed)`` always gives the same data; splits are drawn from
    independent streams, so train, dev and test contexts differ.

    Args:
        task: ``"a"`` (questions name the attribute, all four attributes) or ``"b"`` (the bare name; the
            answer is always ``task_b_attribute``).
        split: A name such as ``"train"`` or ``"dev"``; it seeds the split's stream and prefixes the ids.
        n_questions: Exactly this many questions are generated.
        seed: The base seed.
        task_b_attribute: The attribute task B asks for.
        n_people: The fewest and most people described in one context.

    Returns:
        ``{"version": "1.1", "data": [...]}`` with one article per context.
    """
    if task not in ("a", "b"):
        raise ValueError(f"task must be 'a' or 'b', got {task!r}")
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    # A string seed is hashed deterministically (random.seed version 2), unlike hash() of a tuple.
    rng = random.Random(f"softprompt-synthetic/{seed}/{task}/{split}")
    articles: list[dict[str, Any]] = []
    made = 0
    while made < n_questions:
        people = _people(rng, rng.randint(*n_people))
        context, offsets = _context(rng, people)
        if task == "a":
            pairs = [(i, attr) for i in range(len(people)) for attr in ATTRIBUTES]
            pairs = rng.sample(pairs, min(len(pairs), rng.randint(2, 4)))
        else:
            pairs = [(i, task_b_attribute) for i in rng.sample(range(len(people)), rng.randint(1, 2))]
        qas = []
        for i, attr in pairs[: n_questions - made]:
            person = people[i]
            if task == "a":
                question = rng.choice(QUESTIONS[attr]).format(n=person.name)
            else:
                question = person.name
            value = person.values[attr]
            qas.append(
                {
                    "id": f"{task}-{split}-{made:05d}",
                    "question": question,
                    "answers": [{"text": value, "answer_start": offsets[(i, attr)]}],
                }
            )
            made += 1
        articles.append({"title": f"{task}-{split}-{len(articles):05d}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


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
    for templates in (*STATEMENTS.values(), *QUESTIONS.values()):
        for template in templates:
            text = template.replace("{n}", " ").replace("{v}", " ").replace("{a}", " ")
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
