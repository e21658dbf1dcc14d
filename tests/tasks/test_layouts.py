"""The SuperGLUE presets and layouts write exactly the text T5 fed the paper's runs.

Every expected string below is written out by hand from T5's code (t5/data/preprocessors.py glue,
record, _wsc_inputs + wsc_simple; t5/data/glue_utils.py feature orders; TFDS super_glue 1.0.2
_generate_examples and _fix_wst), without the leading task name the paper dropped
(prompt-tuning's taskless_super_glue_* tasks). The rows are in the official SuperGLUE JSONL layout, plus
one Hugging Face super_glue row for each layout that flattens records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from softprompt.config.choices import TaskMetric
from softprompt.errors import DataError
from softprompt.tasks.layouts import (
    LAYOUTS,
    expand_multirc,
    expand_record,
    expand_wsc,
    record_passage,
    wsc_marked_text,
)
from softprompt.tasks.text.presets import load_task, preset_names

TASKS = Path(__file__).resolve().parents[2] / "configs" / "tasks"


def examples(name: str, records: list[dict[str, Any]], for_training: bool = False) -> list[tuple]:
    """``(id, inputs, targets, label, group)`` of each example the preset ``name`` makes of ``records``."""
    task = load_task(name)
    found = task.examples_from_records(
        [(f"line {i}", r) for i, r in enumerate(records, start=1)],
        source="val.jsonl",
        for_training=for_training,
    )
    return [(e.id, e.inputs, e.targets, e.label, e.group) for e in found]


# ----------------------------------------------------------------------------------------------------------
# The presets themselves.


def test_every_preset_loads_names_its_source_and_launch_line():
    expected = {
        "boolq": ("accuracy", "rows"),
        "cb": ("macro_f1", "rows"),
        "copa": ("accuracy", "rows"),
        "multirc": ("multirc", "multirc"),
        "record": ("record", "record"),
        "rte": ("accuracy", "rows"),
        "wic": ("accuracy", "rows"),
        "wsc": ("wsc", "wsc"),
    }
    assert set(expected) | {"squad"} <= set(preset_names())
    assert load_task("squad").is_qa
    for name, (metric, layout) in expected.items():
        task = load_task(name)
        assert (task.name, task.metric, task.layout) == (name, TaskMetric(metric), layout)
        assert task.dataset is not None and task.dataset["name"] == "aps/super_glue"
        # Where the format comes from, in the header (the model card's description).
        assert "t5/data/" in task.description and "prompt_tuning/data/super_glue.py" in task.description
        # The paper's format: no task name in front of the input.
        assert task.input_template is not None and not task.input_template.startswith(name)
        text = (TASKS / f"{name}.yaml").read_text(encoding="utf-8")
        assert text.startswith("# ") and f"\n# Launch: softprompt train --task {name} " in text


# ----------------------------------------------------------------------------------------------------------
# The five tasks whose JSONL rows the template reads as they are (T5's preprocessors.glue).


def test_boolq_passage_then_question_and_bool_labels():
    records = [
        {
            "question": "is the sky blue",
            "passage": "Sky -- The sky appears blue because of Rayleigh scattering.",
            "idx": 0,
            "label": True,
        },
        {
            "question": "can penguins fly",
            "passage": "Penguins are flightless birds.",
            "idx": 1,
            "label": False,
        },
        # A Hugging Face super_glue/boolq row: the label is the class index.
        {"question": "can penguins swim", "passage": "Penguins swim well.", "idx": 2, "label": 1},
    ]
    assert examples("boolq", records) == [
        (
            "0",
            "passage: Sky -- The sky appears blue because of Rayleigh scattering. question: is the sky blue",
            ("True",),
            "True",
            None,
        ),
        (
            "1",
            "passage: Penguins are flightless birds. question: can penguins fly",
            ("False",),
            "False",
            None,
        ),
        ("2", "passage: Penguins swim well. question: can penguins swim", ("True",), "True", None),
    ]


def test_cb_hypothesis_then_premise_keeps_the_text_as_it_is():
    records = [
        {
            "premise": "It was a complex language. Not written down but handed down.  One might say it was peeled down.",
            "hypothesis": "the language was peeled down",
            "label": "entailment",
            "idx": 0,
        },
        {"premise": "I don't know if it rained.", "hypothesis": "it rained", "label": "neutral", "idx": 1},
        {"premise": "He is not here.", "hypothesis": "he is here", "label": "contradiction", "idx": 2},
        # A Hugging Face super_glue/cb row: TFDS's class order, so 1 is contradiction.
        {"premise": "She left.", "hypothesis": "she stayed", "label": 1, "idx": 3},
    ]
    assert examples("cb", records) == [
        (
            "0",
            # T5 joins with single spaces and collapses nothing: the premise's double space stays.
            "hypothesis: the language was peeled down premise: It was a complex language. Not written down "
            "but handed down.  One might say it was peeled down.",
            ("entailment",),
            "entailment",
            None,
        ),
        ("1", "hypothesis: it rained premise: I don't know if it rained.", ("neutral",), "neutral", None),
        ("2", "hypothesis: he is here premise: He is not here.", ("contradiction",), "contradiction", None),
        ("3", "hypothesis: she stayed premise: She left.", ("contradiction",), "contradiction", None),
    ]
    assert load_task("cb").classes == ("entailment", "contradiction", "neutral")


def test_copa_fields_in_name_order_and_choice_labels():
    records = [
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The sun was rising.",
            "choice2": "The grass was cut.",
            "question": "cause",
            "label": 0,
            "idx": 0,
        },
        {
            "premise": "The woman tolerated her friend's difficult behavior.",
            "choice1": "The woman knew her friend was going through a hard time.",
            "choice2": "The woman felt that her friend took advantage of her kindness.",
            "question": "cause",
            "label": 1,
            "idx": 1,
        },
    ]
    assert examples("copa", records) == [
        (
            "0",
            "choice1: The sun was rising. choice2: The grass was cut. premise: My body cast a shadow over "
            "the grass. question: cause",
            ("choice1",),
            "choice1",
            None,
        ),
        (
            "1",
            "choice1: The woman knew her friend was going through a hard time. choice2: The woman felt that "
            "her friend took advantage of her kindness. premise: The woman tolerated her friend's difficult "
            "behavior. question: cause",
            ("choice2",),
            "choice2",
            None,
        ),
    ]


def test_rte_hypothesis_then_premise():
    records = [
        {
            "premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
            "hypothesis": "Weapons of Mass Destruction Found in Iraq.",
            "label": "not_entailment",
            "idx": 0,
        },
        {
            "premise": "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
            "hypothesis": "Pope John Paul II died.",
            "label": "entailment",
            "idx": 1,
        },
    ]
    assert examples("rte", records) == [
        (
            "0",
            "hypothesis: Weapons of Mass Destruction Found in Iraq. premise: No Weapons of Mass Destruction "
            "Found in Iraq Yet.",
            ("not_entailment",),
            "not_entailment",
            None,
        ),
        (
            "1",
            "hypothesis: Pope John Paul II died. premise: A place of sorrow, after Pope John Paul II died, "
            "became a place of celebration.",
            ("entailment",),
            "entailment",
            None,
        ),
    ]


def test_wic_sentences_then_word_and_offsets_unused():
    records = [
        {
            "word": "place",
            "sentence1": "Do you want to come over to my place later?",
            "sentence2": "A political system with no place for the less prominent groups.",
            "idx": 0,
            "label": False,
            "start1": 31,
            "start2": 27,
            "end1": 36,
            "end2": 32,
            "version": 1.1,
        },
        {
            "word": "bank",
            "sentence1": "He sat on the bank.",
            "sentence2": "The bank of the river flooded.",
            "idx": 1,
            "label": True,
            "start1": 14,
            "start2": 4,
            "end1": 18,
            "end2": 8,
        },
    ]
    assert examples("wic", records) == [
        (
            "0",
            "sentence1: Do you want to come over to my place later? sentence2: A political system with no "
            "place for the less prominent groups. word: place",
            ("False",),
            "False",
            None,
        ),
        (
            "1",
            "sentence1: He sat on the bank. sentence2: The bank of the river flooded. word: bank",
            ("True",),
            "True",
            None,
        ),
    ]


# ----------------------------------------------------------------------------------------------------------
# MultiRC: one row per answer option, HTML markup removed, ids p-q-a, groups q (T5: idx/question).

MULTIRC_PARAGRAPH = "<b>Sent 1: </b>Ann has a red <b>bike</b>.<br><b>Sent 2: </b>She rides it to school.<br>"
MULTIRC = {
    "idx": 3,
    "version": 1.1,
    "passage": {
        "text": MULTIRC_PARAGRAPH,
        "questions": [
            {
                "question": "What does Ann ride?",
                "idx": 10,
                "answers": [
                    {"text": "A red bike", "idx": 40, "label": 1},
                    {"text": "A <b>bus</b>", "idx": 41, "label": 0},
                ],
            },
            {
                "question": "Where does <b>she</b> go?",
                "idx": 11,
                "answers": [{"text": "School", "idx": 42, "label": 1}],
            },
        ],
    },
}
# <br> -> " " first, then <b> and </b> dropped; T5 strips nothing, so the trailing <br> leaves a space.
MULTIRC_CLEAN = "Sent 1: Ann has a red bike. Sent 2: She rides it to school. "


def test_multirc_one_row_per_answer_with_markup_removed():
    assert examples("multirc", [MULTIRC]) == [
        (
            "3-10-40",
            "question: What does Ann ride? answer: A red bike paragraph: " + MULTIRC_CLEAN,
            ("True",),
            "True",
            "10",
        ),
        (
            "3-10-41",
            "question: What does Ann ride? answer: A bus paragraph: " + MULTIRC_CLEAN,
            ("False",),
            "False",
            "10",
        ),
        (
            "3-11-42",
            "question: Where does she go? answer: School paragraph: " + MULTIRC_CLEAN,
            ("True",),
            "True",
            "11",
        ),
    ]
    rows = expand_multirc(MULTIRC, True)
    assert [r["idx"] for r in rows] == [
        {"paragraph": 3, "question": 10, "answer": 40},
        {"paragraph": 3, "question": 10, "answer": 41},
        {"paragraph": 3, "question": 11, "answer": 42},
    ]
    assert rows == expand_multirc(MULTIRC, False)  # training sees the same rows


def test_multirc_hugging_face_row_and_unlabelled_option():
    flat = {
        "paragraph": MULTIRC_PARAGRAPH,
        "question": "What does Ann ride?",
        "answer": "A red bike",
        "idx": {"paragraph": 3, "question": 10, "answer": 40},
        "label": 1,
    }
    assert examples("multirc", [flat]) == [
        (
            "3-10-40",
            "question: What does Ann ride? answer: A red bike paragraph: " + MULTIRC_CLEAN,
            ("True",),
            "True",
            "10",
        )
    ]
    test_split = {
        "idx": 0,
        "passage": {
            "text": "P",
            "questions": [{"question": "Q", "idx": 0, "answers": [{"text": "A", "idx": 0}]}],
        },
    }
    (row,) = expand_multirc(test_split, False)
    assert "label" not in row and row["id"] == "0-0-0"


# ----------------------------------------------------------------------------------------------------------
# ReCoRD: entities text[start:end+1], distinct and sorted; answers distinct and sorted; @highlight rules.

RECORD_TEXT = "Zoe met Bob in Paris. Bob left.\n@highlight\nZoe stayed in Paris\n@highlight\nBob went home!"
RECORD = {
    "source": "Daily mail",
    "idx": 5,
    "passage": {
        "text": RECORD_TEXT,
        # Listed out of order, with repeats: TFDS keeps the distinct texts, sorted.
        "entities": [
            {"start": 57, "end": 61},
            {"start": 0, "end": 2},
            {"start": 8, "end": 10},
            {"start": 15, "end": 19},
            {"start": 22, "end": 24},
            {"start": 43, "end": 45},
            {"start": 74, "end": 76},
        ],
    },
    "qas": [
        {
            "query": "@placeholder went home.",
            "idx": 7,
            "answers": [{"start": 74, "end": 76, "text": "Bob"}, {"start": 8, "end": 10, "text": "Bob"}],
        },
        {
            "query": "@placeholder stayed in Paris.",
            "idx": 8,
            "answers": [
                {"start": 43, "end": 45, "text": "Zoe"},
                {"start": 8, "end": 10, "text": "Bob"},
                {"start": 0, "end": 2, "text": "Zoe"},
            ],
        },
    ],
}
# The first highlight follows "." and becomes a space; the second follows "s" and becomes ". ".
RECORD_PASSAGE = "Zoe met Bob in Paris. Bob left. Zoe stayed in Paris. Bob went home!"


def test_record_entities_sorted_distinct_and_highlights_made_sentences():
    # The hand-written offsets point where they should (end inclusive).
    spans = [(e["start"], e["end"]) for e in RECORD["passage"]["entities"]]
    assert [RECORD_TEXT[s : e + 1] for s, e in spans] == ["Paris", "Zoe", "Bob", "Paris", "Bob", "Zoe", "Bob"]
    assert examples("record", [RECORD]) == [
        (
            "5-7",
            "query: @placeholder went home. entities: Bob, Paris, Zoe passage: " + RECORD_PASSAGE,
            ("Bob",),
            None,
            None,
        ),
        (
            "5-8",
            "query: @placeholder stayed in Paris. entities: Bob, Paris, Zoe passage: " + RECORD_PASSAGE,
            ("Bob", "Zoe"),
            None,
            None,
        ),
    ]
    rows = expand_record(RECORD, True)
    assert [r["idx"] for r in rows] == [{"passage": 5, "query": 7}, {"passage": 5, "query": 8}]
    assert rows == expand_record(RECORD, False)  # one row per query; the caller expands answers


def test_record_hugging_face_row_sorts_set_ordered_entities():
    flat = {
        "passage": RECORD_TEXT,
        "query": "@placeholder went home.",
        "entities": ["Zoe", "Paris", "Bob"],  # datasets stores a Python set: any order
        "entity_spans": {"text": ["Zoe", "Bob"], "start": [0, 8], "end": [3, 11]},
        "answers": ["Bob"],
        "idx": {"passage": 5, "query": 7},
    }
    assert examples("record", [flat]) == [
        (
            "5-7",
            "query: @placeholder went home. entities: Bob, Paris, Zoe passage: " + RECORD_PASSAGE,
            ("Bob",),
            None,
            None,
        )
    ]


def test_record_passage_rules_and_unanswered_query():
    # After . ? ! " ' a highlight is a space; after anything else ". ".
    text = "He said \"no\"\n@highlight\nIt rained\n@highlight\nWhy?\n@highlight\nit's 'ok'\n@highlight\nEnd"
    assert record_passage(text) == "He said \"no\" It rained. Why? it's 'ok' End"
    assert record_passage("One\n@highlight\n@highlight\nTwo") == "One. @highlight\nTwo"
    test_split = {
        "idx": 1,
        "passage": {"text": "Ann ran.", "entities": [{"start": 0, "end": 2}]},
        "qas": [{"query": "@placeholder ran.", "idx": 9}],
    }
    (row,) = expand_record(test_split, False)
    assert row["answers"] == [] and row["entities"] == "Ann" and row["id"] == "1-9"


# ----------------------------------------------------------------------------------------------------------
# WSC: T5's wsc_simple on TFDS's wsc.fixed spans; training keeps the referent rows only.

MARK = "Mark told Pete many lies about himself, which Pete included in his book. He should have been more truthful."
WSC = [
    {
        "text": MARK,
        "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 13, "span2_text": "He"},
        "idx": 0,
        "label": True,
    },
    {
        "text": MARK,
        "target": {"span1_index": 2, "span1_text": "Pete", "span2_index": 13, "span2_text": "He"},
        "idx": 1,
        "label": False,
    },
    {
        "text": "The city councilmen refused the demonstrators a permit because they feared violence.",
        # Not a substring as given: wsc.fixed takes the case of word 0 and strips the period.
        "target": {
            "span1_index": 0,
            "span1_text": "the city councilmen.",
            "span2_index": 9,
            "span2_text": "they",
        },
        "idx": 2,
        "label": True,
    },
]
MARK_MARKED = "Mark told Pete many lies about himself, which Pete included in his book. *He* should have been more truthful."


def test_wsc_marks_the_pronoun_and_targets_the_candidate():
    assert examples("wsc", WSC) == [
        ("0", MARK_MARKED, ("Mark",), "True", None),
        ("1", MARK_MARKED, ("Pete",), "False", None),
        (
            "2",
            "The city councilmen refused the demonstrators a permit because *they* feared violence.",
            ("The city councilmen",),
            "True",
            None,
        ),
    ]


def test_wsc_training_keeps_only_the_correct_referent():
    assert [e[0] for e in examples("wsc", WSC, for_training=True)] == ["0", "2"]
    flat_false = {
        "text": MARK,
        "span1_index": 2,
        "span1_text": "Pete",
        "span2_index": 13,
        "span2_text": "He",
        "idx": 1,
        "label": 0,
    }
    assert expand_wsc(flat_false, True) == []
    assert len(expand_wsc(flat_false, False)) == 1
    with pytest.raises(ValueError, match=r"^label is missing"):
        expand_wsc({k: v for k, v in WSC[0].items() if k != "label"}, True)


def test_wsc_hugging_face_row():
    flat = {
        "text": MARK,
        "span1_index": 0,
        "span1_text": "Mark",
        "span2_index": 13,
        "span2_text": "He",
        "idx": 0,
        "label": 1,
    }
    assert examples("wsc", [flat]) == [("0", MARK_MARKED, ("Mark",), "True", None)]
    # Hugging Face's unlabelled test rows (label -1) keep no label.
    (row,) = expand_wsc({**flat, "label": -1}, False)
    assert "label" not in row and row["marked_text"] == MARK_MARKED


def test_wsc_quirks_of_t5s_marking():
    # The pronoun as the last word: "words before" + " X " + "" leaves a trailing space.
    text = "Joe paid the detective after he delivered the final report on him"
    assert (
        wsc_marked_text(text, "him", 11)
        == "Joe paid the detective after he delivered the final report on *him* "
    )
    # Every " X " is marked, not only the blanked pronoun.
    assert (
        wsc_marked_text("Agent X told Bob that he was late .", "he", 5)
        == "Agent *he* told Bob that *he* was late ."
    )
    # One of the two texts T5 blanks by hand (the pronoun word is 'him,"').
    special = 'The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite loud. "Good for him," he said. '
    assert (
        wsc_marked_text(special, "him", 20)
        == 'The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite loud. "Good for *him* ," he said.'
    )


# ----------------------------------------------------------------------------------------------------------
# Records that do not fit: one clause naming the field.


@pytest.mark.parametrize(
    ("layout", "record", "message"),
    [
        (
            "multirc",
            {
                "idx": 0,
                "passage": {"text": "P", "questions": [{"question": "Q", "idx": 0, "answers": [{"idx": 1}]}]},
            },
            r"^passage\.questions\[0\]\.answers\[0\]\.text is missing$",
        ),
        ("multirc", {"idx": 0, "passage": {"text": 5, "questions": []}}, r"^passage\.text must be a string"),
        ("multirc", {"question": "Q"}, r"^passage is missing"),
        (
            "record",
            {"idx": 0, "passage": {"text": "Ann", "entities": [{"start": 0, "end": 3}]}, "qas": []},
            r"^passage\.entities\[0\] spans characters 0\.\.3",
        ),
        (
            "record",
            {"idx": 0, "passage": {"text": "Ann", "entities": []}, "qas": [{"idx": 0}]},
            r"^qas\[0\]\.query is missing$",
        ),
        ("record", {"passage": "P", "query": "Q", "entities": ["A"], "idx": 3}, r"^idx must be an object"),
        (
            "wsc",
            {
                "text": MARK,
                "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 12, "span2_text": "He"},
                "idx": 0,
            },
            r"^target\.span2_text 'He' is not word 12 of text \('book\.'",
        ),
        (
            "wsc",
            {"text": MARK, "target": {"span1_index": 0, "span2_index": 13, "span2_text": "He"}, "idx": 0},
            r"^target\.span1_text is missing$",
        ),
        (
            "wsc",
            {
                "text": MARK,
                "target": {"span1_index": 0, "span1_text": "Anna", "span2_index": 13, "span2_text": "He"},
                "idx": 0,
            },
            r"^target\.span1_text 'Anna' does not occur in text$",
        ),
        (
            "wsc",
            {
                "text": MARK,
                "span1_index": 0,
                "span1_text": "Mark",
                "span2_index": 13,
                "span2_text": "He",
                "idx": 0,
                "label": "yes",
            },
            r"^label must be true or false",
        ),
        ("wsc", {"text": MARK, "idx": 0}, r"^target is missing"),
    ],
)
def test_bad_records_name_the_field(layout, record, message):
    with pytest.raises(ValueError, match=message):
        LAYOUTS[layout](record, False)


def test_a_bad_record_is_one_line_naming_file_line_and_field():
    bad = {
        "text": MARK,
        "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 12, "span2_text": "He"},
        "idx": 0,
    }
    with pytest.raises(DataError) as err:
        examples("wsc", [WSC[0], bad])
    message = str(err.value)
    assert "\n" not in message
    assert (
        "val.jsonl" in message and "line 2" in message and "target.span2_text 'He' is not word 12" in message
    )


def test_multirc_groups_by_the_question_index_alone_as_t5_does():
    # Issue 25 item 5: T5's postprocessors.multirc groups by idx/question only, so two paragraphs whose
    # questions share an index are one exact-match unit there (and here), not two.
    from softprompt.tasks.metrics.text import score_texts

    def record(p: int) -> dict:
        answers = [{"text": "yes", "idx": 2 * p, "label": 1}, {"text": "no", "idx": 2 * p + 1, "label": 0}]
        return {
            "idx": p,
            "passage": {"text": "P", "questions": [{"question": "Q", "idx": 0, "answers": answers}]},
        }

    task = load_task("multirc")
    found = task.examples_from_records(
        [(f"line {p + 1}", record(p)) for p in range(2)], source="val.jsonl", for_training=False
    )
    assert [e.group for e in found] == ["0", "0", "0", "0"]
    # paragraph 0 all right, paragraph 1 one option wrong: one group of four, not right -> EM 0 (it
    # would be 50 if paragraphs were separate groups).
    scores = score_texts("multirc", found, ["True", "False", "True", "True"])
    assert scores["exact_match"] == 0.0
