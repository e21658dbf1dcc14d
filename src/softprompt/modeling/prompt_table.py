"""A table of K soft prompts [K, P, H] that a batch selects from row by row.

One frozen model serves any number of tasks at once when each row of a batch carries its own prompt
(section 1 of Lester et al., 2021). `PromptTable` holds K prompts of possibly different lengths in one
zero-padded tensor, so a batch's prompts are one index; `select_prompts` turns a table (or a plain
[K, P, H] tensor) and row indices [B] into the per-row prompts [B, P, H] that `PromptedT5.forward`,
`.encode` and `.generate` put in front of each row. Training and serving share this one selection.
"""

from __future__ import annotations

import torch

__all__ = ["PromptTable", "select_prompts"]


class PromptTable:
    """K prompts of possibly different lengths in one zero-padded tensor, so a batch's prompts are one index.

    Args:
        d_model: the prompts' width H.
        device: where the table lives.
    """

    def __init__(self, d_model: int, device: torch.device) -> None:
        self.table = torch.zeros(0, 0, d_model, device=device)  # [K, Pmax, H]
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # [K]

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def append(self, weight: torch.Tensor) -> None:
        """Add one prompt [P, H] (float32, on the table's device) as row K."""
        k, p_max, d_model = self.table.shape
        p = max(p_max, weight.shape[0])
        table = torch.zeros(k + 1, p, d_model, device=self.table.device)
        table[:k, :p_max] = self.table
        table[k, : weight.shape[0]] = weight
        self.table = table
        self.lengths = torch.cat([self.lengths, self.lengths.new_tensor([weight.shape[0]])])

    def stack(self, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row prompts for rows using prompts `tasks` ([B] indices).

        Returns:
            prompt: [B, P, H] float32 with P the longest prompt of these rows (not of the table, so a
            batch of short prompts pays for no padding), and lengths: [B], or None when every row's
            prompt is P long.
        """
        tasks = tasks.to(self.table.device)
        lengths = self.lengths[tasks]
        p = int(lengths.max())
        prompt = self.table[tasks, :p]
        return prompt, None if bool((lengths == p).all()) else lengths


def select_prompts(
    prompt: PromptTable | torch.Tensor,
    rows: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row prompts from a table of prompts and each row's index into it.

    Indexing keeps autograd: a gradient reaches only the prompts that some row selected.

    Args:
        prompt: a `PromptTable`; or a tensor, [K, P, H] when `rows` is given, else already per row
            [B, P, H].
        rows: [B] each row's prompt index (required for a `PromptTable`), or None when `prompt` is per row.
        lengths: the real prompt lengths of a tensor `prompt` ([K] with `rows`, else [B]); None when every
            prompt is P long. Not allowed with a `PromptTable`, which knows its lengths.

    Returns:
        prompt: [B, P', H] and lengths: [B] or None (as `PromptTable.stack` returns them; for a tensor with
        `rows`, P' = P).

    Raises:
        ValueError: a `PromptTable` without `rows`, or with `lengths`.
    """
    if isinstance(prompt, PromptTable):
        if rows is None or lengths is not None:
            raise ValueError("a PromptTable needs row indices and knows its own prompt lengths")
        return prompt.stack(rows)
    if rows is None:
        return prompt, lengths
    rows = rows.to(prompt.device)
    return prompt[rows], None if lengths is None else lengths.to(prompt.device)[rows]
