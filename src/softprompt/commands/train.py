"""`softprompt train`: parse the flags (a resumed run's saved settings first), train, print the results.

Imports nothing heavy at module level: `cli` parses train's flags through `parse_args` before the
trainer (torch, transformers) is imported.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from softprompt.config.parser import config_values, parse, read_yaml_mapping, reports
from softprompt.errors import ConfigError
from softprompt.io.rundir import CONFIG_FILE
from softprompt.training.config import TrainConfig
from softprompt.training.prompts import check_run, is_multi


def _train_checks(cfg: TrainConfig) -> list[str]:
    # A multi-prompt run checks each prompt as its own single-prompt run, naming the entry.
    return check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))[1]


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """train's flags over the config file, over a resumed run's saved settings.

    Args:
        argv: The arguments after `softprompt train`.

    Returns:
        The checked config.

    Raises:
        ConfigError: A resumed run's saved config.yaml holds unknown keys or bad values, or the
            settings do not go together.
    """
    # First pass: where the run lives. A resume's settings come from its saved config, so the
    # combinations are checked once those are in (second pass).
    cfg = parse(TrainConfig, argv, "softprompt train", checks=lambda c: [] if c.resume else _train_checks(c))
    saved_file = Path(cfg.output_dir) / CONFIG_FILE
    if cfg.resume:
        saved = None
        if saved_file.is_file():
            # A resumed run starts from its own saved settings; the config file and the flags given now
            # override them, and the trainer refuses the changes a resume cannot honour.
            saved, problems = config_values(read_yaml_mapping(saved_file), TrainConfig)
            if problems:
                raise ConfigError(f"{saved_file}: " + "; ".join(problems))
            saved.update(resume=True, overwrite_output_dir=False, output_dir=cfg.output_dir)
        cfg = parse(TrainConfig, argv, "softprompt train", defaults=saved, checks=_train_checks)
    return cfg


def run(cfg: TrainConfig) -> int:
    """Train and print the headline results as one JSON line.

    Returns:
        0, or the exit code of a preemption (the run saved its state and can be resumed).
    """
    from softprompt.tasks.resolve import task_from_facts
    from softprompt.training.loop import Preempted, train
    from softprompt.training.multi_loop import train_multi

    multi = is_multi(cfg)
    try:
        results = train_multi(cfg) if multi else train(cfg)
    except Preempted as e:
        # Every rank says where it stopped: that they agree is what a preempted multi-rank job needs to see.
        print(f"softprompt: {e}", file=sys.stderr)
        return e.exit_code
    if not reports():
        return 0  # every rank of a torchrun job returns the same results; rank 0 prints them
    if multi:
        # One line per prompt: its best scores and where its best prompt directory is.
        for name, r in results["prompts"].items():
            shown = {k: r.get(k) for k in ("exact_match", "f1", "best_step")}
            print(json.dumps({"prompt": name, **shown, "best_dir": r["best_dir"]}))
        return 0
    # The run's own task says which scores sum it up (SQuAD's EM/F1, a text task's metric).
    headline = task_from_facts(results).headline(results)
    print(json.dumps({**headline, **{k: results[k] for k in ("best_step", "steps", "train_seconds")}}))
    return 0
