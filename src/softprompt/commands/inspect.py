"""`softprompt inspect`: which vocabulary tokens each learned prompt vector lies closest to.

Section 7 of Lester et al. (2021) reads learned prompts this way: for every prompt position, the
nearest tokens of the frozen model's input embedding table by cosine similarity. A prompt that
was initialised from text starts exactly on its tokens, so inspecting one is also a sanity check.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.commands.flags import InspectArgs
from softprompt.errors import CheckpointError
from softprompt.io.atomic import STDOUT, write_output_json
from softprompt.io.checkpoint import PromptConfig, load_prompt
from softprompt.modeling.model import load_t5, load_tokenizer

# Rows of the embedding table compared at once: bounds the extra memory of normalising a large table
# (T5-XXL's is 32k x 4096) to a few tens of MB.
_VOCAB_CHUNK = 4096
# Names T5 checkpoints give the shared input embedding.
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def nearest_token_ids(
    prompt: torch.Tensor, embedding: torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k embedding rows of highest cosine similarity to each prompt vector.

    Args:
        prompt: [P, H].
        embedding: [V, H] the input embedding table.
        k: how many rows per position (at most V).

    Returns:
        scores: [P, k] cosine similarities, best first, and ids: [P, k] the matching row indices.
    """
    if prompt.dim() != 2 or embedding.dim() != 2:
        raise ValueError(
            f"need prompt [P, H] and embedding [V, H], got {tuple(prompt.shape)} and {tuple(embedding.shape)}"
        )
    if prompt.shape[1] != embedding.shape[1]:
        raise CheckpointError(
            f"the prompt is {prompt.shape[1]} wide but the model's embeddings are {embedding.shape[1]} wide"
        )
    k = max(1, min(k, embedding.shape[0]))
    query = F.normalize(prompt.detach().float(), dim=-1)  # [P, H]
    best_scores = torch.full((prompt.shape[0], 0), float("-inf"))
    best_ids = torch.zeros((prompt.shape[0], 0), dtype=torch.long)
    for start in range(0, embedding.shape[0], _VOCAB_CHUNK):
        rows = F.normalize(embedding[start : start + _VOCAB_CHUNK].detach().float().to(query.device), dim=-1)
        sims = query @ rows.T  # [P, chunk]
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        # A running top-k over chunks: the whole [P, V] similarity matrix is never held at once.
        scores = torch.cat([best_scores, top.values.cpu()], dim=1)
        ids = torch.cat([best_ids, top.indices.cpu() + start], dim=1)
        keep = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores, best_ids = keep.values, ids.gather(1, keep.indices)
    return best_scores, best_ids


def _embedding_from_safetensors(directory: Path) -> torch.Tensor | None:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        found = [(key, directory / weight_map[key]) for key in _EMBEDDING_KEYS if key in weight_map]
    else:
        found = [(key, f) for f in sorted(directory.glob("*.safetensors")) for key in _EMBEDDING_KEYS]
    for key, file in found:
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 (safe_open handles have no __contains__)
                return f.get_tensor(key)
    return None


def load_input_embedding(
    name_or_path: str | os.PathLike, *, random_init: bool = False, seed: int = 42
) -> torch.Tensor:
    """The model's input embedding table [V, H].

    From a local safetensors checkpoint only that one tensor is read, so inspecting a prompt for
    T5-XXL does not load 11B weights; hub ids and `random_init` build the model.
    """
    path = Path(name_or_path)
    if not random_init and path.is_dir():
        table = _embedding_from_safetensors(path)
        if table is not None:
            return table
    model = load_t5(name_or_path, random_init=random_init, seed=seed)
    return model.get_input_embeddings().weight.detach()


def inspect_report(
    weight: torch.Tensor, config: PromptConfig, embedding: torch.Tensor, tokenizer: Any, k: int = 5
) -> dict[str, Any]:
    """The JSON-ready inspection of one prompt: per position, its L2 norm and the k vocabulary tokens
    nearest to it by cosine similarity.

    T5's embedding table has more rows (32128) than its tokenizer has pieces (32100); the extra rows
    are padding that no text can produce, so only the first `len(tokenizer)` rows are searched.

    Args:
        weight: [P, H] the prompt vectors.
        config: the prompt's config (its base model and init are reported).
        embedding: [V, H] the model's input embedding table.
        tokenizer: the model's tokenizer (ids -> SentencePiece pieces such as '▁question').
        k: tokens per position.

    Returns:
        `positions`: per position {position, norm, nearest: [{token, id, cosine}, most similar first]},
        with the prompt's shape, base model, init, `top_k` and the mean token-embedding norm.
    """
    vocab = min(embedding.shape[0], len(tokenizer))
    scores, ids = nearest_token_ids(weight, embedding[:vocab], k)
    norms = weight.float().norm(dim=-1).tolist()
    positions = []
    for p, (row_ids, row_scores) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True)):
        tokens = tokenizer.convert_ids_to_tokens(row_ids)
        positions.append(
            {
                "position": p,
                "norm": norms[p],
                "nearest": [
                    {"token": t, "id": i, "cosine": s}
                    for t, i, s in zip(tokens, row_ids, row_scores, strict=True)
                ],
            }
        )
    return {
        "n_tokens": int(weight.shape[0]),
        "d_model": int(weight.shape[1]),
        "base_model": config.base_model,
        "init": config.init,
        "top_k": min(k, vocab),
        "embedding_norm_mean": float(embedding[:vocab].float().norm(dim=-1).mean()),
        "positions": positions,
    }


def format_table(report: dict[str, Any]) -> str:
    """The inspection as an aligned text table, one row per prompt position."""
    k = report["top_k"]
    header = ["pos", "norm", *[f"top-{j + 1} (cosine)" for j in range(k)]]
    rows = [
        [
            str(pos["position"]),
            f"{pos['norm']:.3f}",
            *[f"{n['token']} ({n['cosine']:.3f})" for n in pos["nearest"]],
        ]
        for pos in report["positions"]
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        f"prompt: P={report['n_tokens']}, d_model={report['d_model']}, init={report['init']}, "
        f"base_model={report['base_model']}; mean token-embedding norm {report['embedding_norm_mean']:.3f}"
    ]
    for r in [header, *rows]:
        cells = [
            r[0].rjust(widths[0]),
            r[1].rjust(widths[1]),
            *(c.ljust(w) for c, w in zip(r[2:], widths[2:], strict=True)),
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`softprompt inspect`: print the table (and write JSON), return the exit code."""
    from softprompt.config.parser import parse

    return run(parse(InspectArgs, argv, "softprompt inspect"))


def run(args: InspectArgs) -> int:
    """Print the table for parsed `InspectArgs` (and write JSON); return the exit code."""
    weight, config = load_prompt(args.prompt_dir)
    model = args.model or config.base_model
    if not args.random_init:
        # Another model's vocabulary says nothing about this prompt; refuse like eval/predict do.
        load_prompt(args.prompt_dir, expect_base_model=model, allow_other=args.allow_other_base_model)
    embedding = load_input_embedding(model, random_init=args.random_init, seed=args.seed)
    if weight.shape[1] != embedding.shape[1]:
        raise CheckpointError(
            f"the prompt in {args.prompt_dir} is {weight.shape[1]} wide but {model}'s d_model is "
            f"{embedding.shape[1]}; it was trained for {config.base_model}"
        )
    report = inspect_report(weight, config, embedding, load_tokenizer(model), args.top_k)
    report["prompt_dir"] = str(args.prompt_dir)
    report["model"] = str(model)
    print(f"{args.prompt_dir} against {model}")
    print(format_table(report))
    if args.output:
        write_output_json(args.output, report)
        if args.output != STDOUT:
            print(f"wrote {args.output}", file=sys.stderr)
    return 0
