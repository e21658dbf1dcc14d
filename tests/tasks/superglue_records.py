"""Official-shaped SuperGLUE test-file records, one per preset, for the tests of unlabelled rows (the
task tests and the command-line ones)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# One official SuperGLUE test-file record per preset (the test files have no "label" / no answers).
TEST_RECORDS: dict[str, Mapping[str, Any]] = {
    "boolq": {"question": "is it", "passage": "P", "idx": 0},
    "cb": {"premise": "P", "hypothesis": "H", "idx": 0},
    "copa": {"premise": "P", "choice1": "a", "choice2": "b", "question": "cause", "idx": 0},
    "rte": {"premise": "P", "hypothesis": "H", "idx": 0},
    "wic": {"word": "w", "sentence1": "a w", "sentence2": "b w", "idx": 0},
    "multirc": {
        "idx": 0,
        "passage": {
            "text": "T<br>x",
            "questions": [{"question": "Q", "idx": 0, "answers": [{"text": "A", "idx": 0}]}],
        },
    },
    "record": {
        "idx": 0,
        "passage": {"text": "Alice went.\n@highlight\nBob", "entities": [{"start": 0, "end": 4}]},
        "qas": [{"query": "@placeholder went", "idx": 0}],
    },
    "wsc": {
        "text": "Mark told Pete he was late .",
        "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 3, "span2_text": "he"},
        "idx": 0,
    },
}
