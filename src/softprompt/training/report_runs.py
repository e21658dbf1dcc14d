"""Reading a training run back: its config.yaml, metrics.jsonl and results.json as a `RunSummary`.

`softprompt.training.report` turns the summaries into tables, `softprompt.training.report_plots`
into learning curves.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softprompt.config.safe_yaml import YamlTooLarge, load_yaml
from softprompt.errors import UserError
from softprompt.io.rundir import BEST, CHECKPOINT_PREFIX, CONFIG_FILE, LAST, METRICS_FILE, RESULTS_FILE

__all__ = ["RunSummary", "as_float", "fmt_score", "is_number", "load_run", "model_basename", "model_size"]

_SIZE_RE = re.compile(r"(?:^|[-_/])(small|base|large|xl|xxl)(?=$|[-_/.])", re.IGNORECASE)


def fmt_score(x: float) -> str:
    """A score with two decimals; "—" for NaN (no score)."""
    return "—" if math.isnan(x) else f"{x:.2f}"


@dataclass
class RunSummary:
    """One finished training run, as read from its directory.

    Attributes:
        path: The run directory.
        label: Name used in tables and legends (the directory name, made unique).
        config: ``config.yaml`` (empty when the file is absent).
        results: ``results.json``.
        train: ``(step, loss)`` points from ``metrics.jsonl``.
        evals: ``(step, exact_match, f1)`` points from ``metrics.jsonl`` (QA runs).
        skipped_lines: ``metrics.jsonl`` lines that could not be parsed.
        eval_scores: ``(step, scores)`` of every evaluation in ``metrics.jsonl``: each numeric score
            under its own name, whatever the task's metric (``accuracy``, ``f1a``, ``f1``, ...).
    """

    path: Path
    label: str
    config: dict[str, Any]
    results: dict[str, Any]
    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    skipped_lines: int = 0
    eval_scores: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def _get(self, key: str, default: Any = None) -> Any:
        value = self.results.get(key)
        return self.config.get(key, default) if value is None else value

    @property
    def model(self) -> str:
        """The base model's name without any hub organisation or local folder."""
        return model_basename(self._get("model_name_or_path", "?"))

    @property
    def mode(self) -> str:
        """``"prompt"`` or ``"finetune"``."""
        mode = self.results.get("mode")
        if mode in ("prompt", "finetune"):
            return str(mode)
        return "prompt" if _truthy(self.config.get("prompt_tuning")) else "finetune"

    @property
    def optimizer(self) -> str:
        """The optimizer's name."""
        return str(self._get("optimizer", "?"))

    @property
    def lr(self) -> float:
        """The peak learning rate (NaN when not recorded)."""
        return as_float(self._get("lr"))

    @property
    def n_tokens(self) -> int | None:
        """Prompt length P for prompt tuning, None for fine-tuning."""
        value = self._get("n_tokens")
        return int(value) if self.mode == "prompt" and value is not None else None

    @property
    def score_name(self) -> str:
        """The name of the score that chose the run's best step: a text task's first score (results.json's
        ``scores``, in its metric's order), else SQuAD's ``f1``."""
        scores = self.results.get("scores")
        return str(next(iter(scores))) if isinstance(scores, dict) and scores else "f1"

    @property
    def score(self) -> float:
        """The best dev value of `score_name` (0..100); NaN for a run without a dev set."""
        scores = self.results.get("scores")
        value = scores.get(self.score_name) if isinstance(scores, dict) else self.results.get("f1")
        return float(value) if is_number(value) else math.nan

    @property
    def score_label(self) -> str:
        """What `score` is, for tables and legends: ``f1`` for SQuAD, ``rte accuracy`` for a text task."""
        task = self.results.get("task")
        return f"{task} {self.score_name}" if task else self.score_name

    def score_curve(self) -> list[tuple[int, float]]:
        """``(step, value)`` of `score_name` at each evaluation in ``metrics.jsonl``."""
        name = self.score_name
        return [(step, scores[name]) for step, scores in self.eval_scores if name in scores]

    @property
    def scored(self) -> bool:
        """Whether the run was evaluated (a run trained without a dev set has no scores)."""
        return not math.isnan(self.score)

    @property
    def exact_match(self) -> float:
        """Best dev exact match (0..100); NaN for a run without a dev set or a metric without one."""
        return as_float(self.results.get("exact_match"))

    @property
    def f1(self) -> float:
        """Best dev F1 (0..100); NaN for a run without a dev set or a metric without one."""
        return as_float(self.results.get("f1"))

    @property
    def punctuation(self) -> str | None:
        """The text format (paper, current, none), or None for a run that does not record one."""
        value = self._get("punctuation")
        if value is None and isinstance(self.config.get("pad_punctuation"), bool):
            from softprompt.config.choices import LEGACY_PAD_PUNCTUATION

            value = LEGACY_PAD_PUNCTUATION[self.config["pad_punctuation"]]
        return None if value is None else str(value)

    @property
    def task_score(self) -> str:
        """A text task's selection score, e.g. ``rte accuracy 71.5``; "—" for QA runs and runs without one."""
        scores = self.results.get("scores")
        if not isinstance(scores, dict) or not scores:
            return "—"
        key, value = next(iter(scores.items()))
        if not is_number(value):
            return "—"
        return f"{self.results.get('task', '?')} {key} {fmt_score(float(value))}"

    def t5_score(self, key: str) -> float | None:
        """``t5_exact_match`` or ``t5_f1`` from results.json: T5's own scoring of padded text, if any."""
        value = self.results.get(key)
        return float(value) if is_number(value) else None

    def effective_config(self) -> dict[str, Any]:
        """The config used to decide whether runs pair up, completed from ``results.json``."""
        eff = dict(self.config)
        for key in ("model_name_or_path", "optimizer", "lr", "n_tokens"):
            if key not in eff and key in self.results:
                eff[key] = self.results[key]
        eff["prompt_tuning"] = self.mode == "prompt"
        return eff


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def as_float(value: Any) -> float:
    """`value` as a float; NaN when it is none (a missing or non-numeric setting)."""
    # PyYAML reads "1e-5" (no dot) as a string, so numbers from config.yaml may be text.
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def model_basename(name: Any) -> str:
    """The short name of a model id or path; RUN/best or RUN/checkpoint-N for a softprompt run's own model."""
    path = Path(str(name).rstrip("/"))
    # A model fine-tuned by softprompt is referred to as RUN/best or RUN/checkpoint-N: name the run.
    if path.name in (BEST, LAST) or path.name.startswith(CHECKPOINT_PREFIX):
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return path.name or str(name)


def model_size(model_name_or_path: str) -> str:
    """The T5 size named in a model id or path, e.g. ``"base"`` for ``google/t5-v1_1-base``.

    Args:
        model_name_or_path: A hub id or local folder.

    Returns:
        One of ``small``, ``base``, ``large``, ``xl``, ``xxl``, or the model's base name when
        no size can be read from it (so only runs of the very same model pair up).
    """
    name = model_basename(model_name_or_path)
    match = _SIZE_RE.search(name)
    return match.group(1).lower() if match else name


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {path.parent} a finished softprompt training run?") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except YamlTooLarge as exc:
        raise UserError(f"{path} is refused: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys, found {type(data).__name__}")
    return data


def _drop_superseded(points: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Keep only the last run's points where a resumed run re-logged steps it had already done.

    A run resumed from a checkpoint at step 1000 after it had logged up to step 1200 appends
    steps 1000.. again; the older 1000..1200 points belong to a trajectory that was discarded.
    """
    kept: list[tuple[Any, ...]] = []
    for point in points:
        while kept and kept[-1][0] >= point[0]:
            kept.pop()
        kept.append(point)
    return kept


def _read_metrics(
    path: Path,
    prompt: str | None = None,
) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]], list[tuple[int, dict[str, float]]], int]:
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float, float]] = []
    scores: list[tuple[int, dict[str, float]]] = []
    skipped = 0
    if not path.exists():
        return train, evals, scores, skipped
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed in mid-write leaves one cut-off line; losing that single point
                # is better than refusing to report the whole run.
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                skipped += 1
                continue
            if record.get("prompt") != prompt:  # a multi-prompt run logs each prompt under its name
                continue
            event, step = record.get("event"), record["step"]
            if event == "train" and is_number(record.get("loss")):
                train.append((step, float(record["loss"])))
            elif event == "eval":
                numbers = {
                    k: float(v)
                    for k, v in record.items()
                    if k not in ("step", "time", "prompt") and is_number(v)
                }
                if numbers:
                    scores.append((step, numbers))
                if is_number(record.get("exact_match")) and is_number(record.get("f1")):
                    evals.append((step, float(record["exact_match"]), float(record["f1"])))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unreadable line(s)", stacklevel=3)
    return _drop_superseded(train), _drop_superseded(evals), _drop_superseded(scores), skipped  # type: ignore[return-value]


def is_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_runs(run_dir: Path, label: str | None = None) -> list[RunSummary]:
    """Read one run directory: one summary, or for a multi-prompt run (`--num_prompts`, `prompts:`) one
    per prompt, labelled ``<run>/<prompt>``, each with its own results, curves and scores.

    Raises:
        UserError: As `load_run`.
    """
    run_dir = Path(run_dir)
    results = _read_json_object(run_dir / RESULTS_FILE) if run_dir.is_dir() else {}
    prompts = results.get("prompts")
    if not isinstance(prompts, dict) or not prompts:
        return [load_run(run_dir, label)]
    label = label or run_dir.resolve().name
    return [load_run(run_dir, f"{label}/{name}", prompt=str(name)) for name in prompts]


def load_run(run_dir: Path, label: str | None = None, prompt: str | None = None) -> RunSummary:
    """Read one run directory.

    ``results.json`` is required; ``config.yaml`` and ``metrics.jsonl`` are used when present.

    Args:
        run_dir: The training run's output directory.
        label: Name for tables and legends; the directory name when None.
        prompt: In a multi-prompt run, the prompt to read: its entry of results.json's ``prompts`` and
            its records of ``metrics.jsonl``.

    Returns:
        The parsed run.

    Raises:
        UserError: The directory or ``results.json`` is missing, or a file is malformed; the
            message names the file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the output_dir of a training run")
    results_path = run_dir / RESULTS_FILE
    results = _read_json_object(results_path)
    if prompt is not None:
        entry = (results.get("prompts") or {}).get(prompt)
        if not isinstance(entry, dict):
            raise UserError(f"{results_path} has no results for prompt {prompt!r}")
        results = {**{k: v for k, v in results.items() if k != "prompts"}, **entry}
    for key in ("exact_match", "f1"):
        # null: a finished run that had no dev set (reported without scores); absent or text: not a run.
        if key not in results or not (results[key] is None or is_number(results[key])):
            raise UserError(
                f"{results_path} has no numeric {key!r}; was the run finished by softprompt train?"
            )
    config = _read_config(run_dir / CONFIG_FILE)
    train, evals, eval_scores, skipped = _read_metrics(run_dir / METRICS_FILE, prompt)
    return RunSummary(
        path=run_dir,
        label=label or run_dir.resolve().name,
        config=config,
        results=results,
        train=train,
        evals=evals,
        skipped_lines=skipped,
        eval_scores=eval_scores,
    )
