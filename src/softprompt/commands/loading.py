"""What `eval` and `predict` both read from their flags: the text task, and the model with its prompts."""

from __future__ import annotations

from collections.abc import Sequence

from softprompt.commands.flags import EvalArgs, PredictArgs
from softprompt.inference.bank import PromptBank, load_model_and_prompts
from softprompt.io.checkpoint import load_prompt_config
from softprompt.tasks.text.task import TaskSpec, task_from_flags


def task_of(args: EvalArgs | PredictArgs, prompt_dirs: Sequence[str]) -> TaskSpec | None:
    """The text task of --task and the template flags, else the first prompt's own; None for QA."""
    saved = load_prompt_config(prompt_dirs[0]).task if prompt_dirs else None
    return task_from_flags(args, saved)


def load_bank(args: EvalArgs | PredictArgs, prompt_dirs: Sequence[str]) -> PromptBank:
    """The model of --model (or --random_init) with the prompts of `prompt_dirs`, as the model flags ask."""
    return load_model_and_prompts(
        args.model_name_or_path,
        list(prompt_dirs),
        random_init=args.random_init,
        seed=args.seed,
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
        fast_path=args.fast_path,
    )
