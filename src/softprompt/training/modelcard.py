"""A README.md model card for a saved prompt checkpoint.

The card records what a soft prompt is only meaningful with, the frozen base model and the
data and hyperparameters it was trained with, plus its dev scores and how to load it, so a
prompt directory copied on its own still says what it is.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import softprompt
from softprompt.errors import CheckpointError
from softprompt.io.atomic import atomic_write_text
from softprompt.tasks.base import TaskCard
from softprompt.tasks.resolve import task_from_facts

__all__ = ["CARD_FILE", "render_model_card", "write_model_card"]

CARD_FILE = "README.md"
# One mark for "not set" (epochs when max_steps rules) and "not passed in".
_MISSING = "—"


def _first(info: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = info.get(key)
        if value is not None and value != "":
            return value
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return str(value)


def _fmt_score(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):.2f}"
    return _MISSING


def _row_if(
    info: Mapping[str, Any], key: str, label: str, show: Callable[[Any], str]
) -> tuple[str, str] | None:
    value = info.get(key)
    return None if value is None or value == "" else (label, show(value))


def _md(value: str) -> str:
    # Table cells: a pipe would split the cell, a newline would end the row.
    return value.replace("|", "\\|").replace("\n", " ")


def render_model_card(checkpoint_dir: Path, info: Mapping[str, Any]) -> str:
    """Build the card's Markdown text without writing it.

    Args:
        checkpoint_dir: The prompt checkpoint folder the card describes, as users will load it (its
            final location, not a temporary folder it is being written in).
        info: Run facts, usually the resolved config merged with ``results.json``. Keys read:
            ``model_name_or_path`` (or ``base_model``; required), ``train_file``,
            ``validation_file``, ``mode``/``prompt_tuning``, ``optimizer``, ``lr``,
            ``weight_decay``, ``initial_step``, ``punctuation``, ``n_tokens``, ``prompt_init`` (or
            ``init``), ``prompt_init_text``,
            ``global_batch_size``, ``batch_size``, ``steps``/``max_steps``, ``epochs``,
            ``precision``, ``seed``, ``random_init`` (and ``random_init_seed``, the weights' seed when it differs), ``trainable_parameters``, ``exact_match``, ``f1``,
            ``t5_exact_match``, ``t5_f1``, ``best_step``; for a text task ``task``, ``task_description``,
            ``input_template``, ``metric`` and ``scores`` (its dev scores). A key that is absent or None
            shows as "—" (the T5 score rows and the Adafactor initial step appear only when given).

    Returns:
        The card, starting with YAML front matter.

    Raises:
        ValueError: ``info`` does not name the base model.
    """
    model = _first(info, ("model_name_or_path", "base_model"))
    if model is None:
        # A prompt is useless without its frozen model, so a card that omits it is a bug.
        raise ValueError("model card info must name the base model (model_name_or_path)")
    base_model = str(model)
    card = task_from_facts(info).card(info)
    prompt_mode = info.get("mode", "prompt") == "prompt" and info.get("prompt_tuning", True) is not False
    lines = ["---", _front_matter(base_model, card).rstrip("\n"), "---", ""]
    lines += _title_and_intro(base_model, card, prompt_mode)
    lines += [
        "",
        "## Base model",
        "",
        f"`{base_model}`",
        "",
        "## Data",
        "",
        "| split | file |",
        "|---|---|",
        f"| train | {_md(_fmt(info.get('train_file')))} |",
        f"| validation | {_md(_fmt(info.get('validation_file')))} |",
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_md(value)} |" for key, value in _hyperparameter_rows(info, prompt_mode)]
    lines += _task_section(card)
    lines += [
        "",
        "## Dev results",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += _score_rows(card, info)
    # A base model built with random weights is only that model again with the same flags and seed.
    random = (
        ["--random_init", "--seed", str(_first(info, ("random_init_seed", "seed")))]
        if info.get("random_init") and prompt_mode
        else []
    )
    lines += _how_to_load(str(checkpoint_dir), base_model, card, prompt_mode, random)
    lines += ["", f"Written by softprompt {softprompt.__version__}."]
    return "\n".join(lines) + "\n"


def _front_matter(base_model: str, card: TaskCard) -> str:
    """The card's YAML front matter (without the ``---`` fences), ending in a newline."""
    front = {
        "library_name": "softprompt",
        "base_model": base_model,
        "tags": ["prompt-tuning", "t5", card.tag],
    }
    # safe_dump quotes whatever needs quoting (a path with ':' or a leading '*').
    return yaml.safe_dump(front, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _title_and_intro(base_model: str, card: TaskCard, prompt_mode: bool) -> list[str]:
    """The card's heading and its first paragraph: what was trained, for what."""
    what, on = card.subject, _md(card.title_on)
    if prompt_mode:
        title = f"# Soft prompt for `{_md(base_model)}` on {on}"
        intro = (
            "A soft prompt trained with softprompt, an implementation of prompt tuning "
            f"([Lester et al., 2021](https://arxiv.org/abs/2104.08691)), for {what}. "
            "It is a small matrix of embeddings prepended to the input of a frozen T5; "
            "it only works with the base model below."
        )
    else:
        title = f"# `{_md(base_model)}` fine-tuned on {on}"
        intro = (
            f"All weights of the base model below fine-tuned with softprompt for {what}, "
            "the baseline that prompt tuning is compared with."
        )
    return [title, "", intro]


def _hyperparameter_rows(info: Mapping[str, Any], prompt_mode: bool) -> list[tuple[str, str]]:
    """The (setting, value) rows of the hyperparameter table, unescaped; rows of unset optional keys left out."""
    steps = _first(info, ("steps", "max_steps"))
    # (label, value) rows; optional rows are None and dropped, so the order stays readable here.
    optional: list[tuple[str, str] | None] = [
        ("Method", "prompt tuning (base model frozen)" if prompt_mode else "full fine-tuning"),
        ("Prompt length P", _fmt(info.get("n_tokens"))),
        _row_if(info, "trainable_parameters", "Trainable parameters", lambda v: f"{int(v):,}"),
        ("Prompt init", _fmt(_first(info, ("prompt_init", "init", "init_method")))),
        _row_if(info, "prompt_init_text", "Prompt init text", lambda v: repr(str(v))),
        ("Optimizer", _fmt(info.get("optimizer"))),
        ("Learning rate", _fmt(info.get("lr"))),
        ("Weight decay", _fmt(info.get("weight_decay"))),
        # T5X continues the starting checkpoint's step count; it sets Adafactor's second-moment decay.
        _row_if(info, "initial_step", "Adafactor initial step", lambda v: f"{int(v):,}"),
        ("Input text", _fmt(info.get("punctuation"))),
        ("Batch size (global)", _fmt(_first(info, ("global_batch_size", "batch_size")))),
        # With a global size recorded, batch_size is the per-device share of it.
        _row_if(info, "batch_size", "Batch size per device", _fmt)
        if info.get("global_batch_size") is not None
        else None,
        ("Training steps", _fmt(steps)),
        ("Epochs", _fmt(info.get("epochs"))),
        ("Precision", _fmt(info.get("precision"))),
        ("Seed", _fmt(info.get("seed"))),
    ]
    return [row for row in optional if row is not None]


def _score_rows(card: TaskCard, info: Mapping[str, Any]) -> list[str]:
    """The dev-result rows (the task's scores and the best step) and the note under them."""
    rows = [
        f"| {_md(label)} | {value if isinstance(value, int) else _fmt_score(value)} |"
        for label, value in card.scores
    ] or ["| — | — |"]
    return [*rows, f"| best step | {_fmt(info.get('best_step'))} |", "", _md(card.score_note)]


def _how_to_load(
    ckpt: str, base_model: str, card: TaskCard, prompt_mode: bool, model_flags: Sequence[str] = ()
) -> list[str]:
    """The "How to load" section: Python that loads the checkpoint and a runnable `softprompt predict`
    line (`model_flags`: how the base model was built, e.g. ``--random_init --seed 7``)."""
    # A prompt is used together with its frozen base model; a fine-tuned checkpoint is the model.
    predict = ["softprompt", "predict", "--model", base_model, *model_flags, "--prompt", ckpt]
    if not prompt_mode:
        predict = ["softprompt", "predict", "--model", ckpt]
    cli = " ".join(shlex.quote(arg) for arg in [*predict, *card.predict_args])
    if prompt_mode:
        load = [
            "from softprompt.io.checkpoint import load_prompt",
            "",
            "# The [P, d_model] prompt tensor and its PromptConfig (base model, input template, ...).",
            f"prompt, prompt_config = load_prompt({ckpt!r})",
        ]
    else:
        load = [
            "from transformers import T5ForConditionalGeneration",
            "",
            f"model = T5ForConditionalGeneration.from_pretrained({ckpt!r})",
        ]
    return [
        "",
        "## How to load",
        "",
        "```python",
        *load,
        "```",
        "",
        "From the command line:",
        "",
        "```bash",
        cli,
        "```",
    ]


def _task_section(card: TaskCard) -> list[str]:
    """The card's "Task" section, when the task says more than its name (a text task's format)."""
    if not card.about:
        return []
    return ["", "## Task", *(line for paragraph in card.about for line in ("", _md(paragraph)))]


def write_model_card(checkpoint_dir: Path, info: Mapping[str, Any], *, location: Path | None = None) -> Path:
    """Write ``README.md`` into a saved prompt checkpoint, replacing any earlier card atomically.

    Args:
        checkpoint_dir: An existing checkpoint folder.
        info: Run facts; see :func:`render_model_card` for the keys read.
        location: Where the checkpoint will live once written, when ``checkpoint_dir`` is a temporary
            folder that is renamed into place afterwards; the card's load instructions name it.

    Returns:
        The path of the written card.

    Raises:
        CheckpointError: ``checkpoint_dir`` does not exist or is not a folder.
        ValueError: ``info`` does not name the base model.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir} is not a checkpoint folder; save the prompt before its card")
    path = checkpoint_dir / CARD_FILE
    atomic_write_text(
        path, render_model_card(Path(location) if location is not None else checkpoint_dir, info)
    )
    return path
