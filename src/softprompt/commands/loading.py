"""What `eval` and `predict` both read from their flags: the text task, and the model with its prompts."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from softprompt.commands.flags import EvalArgs, PredictArgs
from softprompt.inference.bank import PromptBank, load_model_and_prompts
from softprompt.io.checkpoint import load_prompt_config
from softprompt.tasks.base import Task
from softprompt.tasks.resolve import resolve_task, task_from_saved


def task_of(args: EvalArgs | PredictArgs, prompt_dirs: Sequence[str]) -> Task:
    """The task of --task and the template flags, else the first prompt's own, else SQuAD in --punctuation
    (default: the first prompt's, else raw text); a warning on stderr when the flags name another task than
    the prompt recorded."""
    config = load_prompt_config(prompt_dirs[0]) if prompt_dirs else None
    punctuation = args.punctuation or (config.punctuation if config else "none")
    task = resolve_task(args, config.task if config else None, punctuation=punctuation)
    if config is not None:
        recorded = task_from_saved(config.task, punctuation=config.punctuation)
        if (task.name, task.to_dict()) != (recorded.name, recorded.to_dict()):
            # Allowed (a prompt tried on a related task), but never silently: the scores are not its task's.
            print(
                f"softprompt: warning: the prompt in {prompt_dirs[0]} was trained on {recorded.name}, but the "
                f"flags name {task.name}; its inputs are written and scored as {task.name}'s",
                file=sys.stderr,
                flush=True,
            )
    return task


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
