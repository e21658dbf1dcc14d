"""Optimizers: Adafactor exactly as T5X ran prompt tuning, plus the baselines earlier replications used.

Why our own Adafactor: the paper tunes prompts with T5X's Adafactor, whose weight decay is decoupled from
the learning rate, ``p <- (1 - wd) * p - lr * u``. Both ``transformers`` and ``torch`` scale the decay by
the learning rate, which at lr = 0.3 makes it 0.3x as strong as intended. Ours also factors the second
moment only for matrices whose last two dims are both >= 128, as T5X does, so a [100, d_model] prompt keeps
a full second-moment estimate instead of a rank-1 one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.optimizer import ParamsT

from softprompt.config.choices import Optimizer
from softprompt.config.choices import values as choice_values
from softprompt.errors import ConfigError

__all__ = ["OPTIMIZER_NAMES", "Adafactor", "build_optimizer", "linear_warmup_decay"]

_ALIASES = {"adam": "adamw"}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(v for v in choice_values(Optimizer) if v not in _ALIASES)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 parameters are updated in float32 (their moments would underflow otherwise); float64
    # parameters keep float64 so that nothing is silently rounded.
    return torch.promote_types(dtype, torch.float32)


class Adafactor(torch.optim.Optimizer):
    """Adafactor without momentum, with T5X's decoupled weight decay and update clipping.

    For the ``k``-th update this optimizer applies (1-based) and gradient ``g``, with
    ``t = initial_step + k`` and ``beta2 = 1 - t ** -decay_rate``:

    * unfactored: ``v <- beta2 * v + (1 - beta2) * (g**2 + eps1)``, ``u = g / sqrt(v)``;
    * factored (last two dims both >= ``min_dim_size_to_factor``): running means of ``g**2 + eps1`` over
      rows and columns, ``v_hat = outer(r / mean(r), c)``, ``u = g / sqrt(v_hat)``;
    * ``u <- u / max(1, RMS(u) / clipping_threshold)``;
    * ``p <- (1 - weight_decay) * p - lr_eff * u`` where ``lr_eff = lr``, or
      ``lr * max(eps2, RMS(p))`` with ``multiply_by_parameter_scale``.

    ``initial_step`` is T5X's step counter at the start: T5X restores it from the checkpoint it fine-tunes,
    and its Adafactor decays with ``1 - (step + 1) ** -decay_rate`` (``step_offset = 0`` in prompt tuning's
    gin config), so prompt tuning from the LM-adapted checkpoints ran with ``initial_step = 1_100_000``:
    ``beta2`` is about 0.9999853 from the first update on, while the second moment starts at zero, and the
    update is clipped at every step. With ``initial_step = 0``, ``beta2 = 0`` at the first update, which
    uses ``g**2 + eps1`` as is (textbook Adafactor from scratch). ``state_dict()`` carries both the
    per-parameter update count and ``initial_step``, so a resumed run continues the same sequence.

    State is kept in float32
    for bf16/fp16/fp32 parameters (float64 for float64 ones); the update is computed in that precision and
    written back in the parameter dtype.

    Args:
        params: Parameters or parameter groups.
        lr: Constant learning rate (0.3 for prompts in the paper).
        decay_rate: Exponent ``c`` of the second-moment decay ``beta2_t = 1 - t ** -c``.
        eps1: Added to the squared gradient.
        clipping_threshold: Cap on RMS(u); None disables update clipping.
        weight_decay: Decoupled decay rate; not multiplied by the learning rate.
        min_dim_size_to_factor: Factor the second moment only when the last two dims are both at least this.
        multiply_by_parameter_scale: Scale the learning rate by ``max(eps2, RMS(p))``.
        eps2: Floor of the parameter scale.
        initial_step: The step count of the checkpoint training starts from (T5X's restored step); the
            first update uses ``beta2 = 1 - (initial_step + 1) ** -decay_rate``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.3,
        decay_rate: float = 0.8,
        eps1: float = 1e-30,
        clipping_threshold: float | None = 1.0,
        weight_decay: float = 0.0,
        min_dim_size_to_factor: int = 128,
        multiply_by_parameter_scale: bool = False,
        eps2: float = 1e-3,
        initial_step: int = 0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Adafactor lr must be >= 0, got {lr}")
        if decay_rate <= 0.0:
            raise ValueError(f"Adafactor decay_rate must be > 0, got {decay_rate}")
        if eps1 < 0.0 or eps2 < 0.0:
            raise ValueError(f"Adafactor eps1 and eps2 must be >= 0, got {eps1} and {eps2}")
        if clipping_threshold is not None and clipping_threshold <= 0.0:
            raise ValueError(f"Adafactor clipping_threshold must be > 0 or None, got {clipping_threshold}")
        if not 0.0 <= weight_decay < 1.0:
            raise ValueError(f"Adafactor weight_decay must be in [0, 1), got {weight_decay}")
        if isinstance(initial_step, bool) or not isinstance(initial_step, int) or initial_step < 0:
            raise ValueError(f"Adafactor initial_step must be an integer >= 0, got {initial_step!r}")
        if min_dim_size_to_factor < 1:
            raise ValueError(f"Adafactor min_dim_size_to_factor must be >= 1, got {min_dim_size_to_factor}")
        defaults: dict[str, Any] = {
            "lr": lr,
            "decay_rate": decay_rate,
            "eps1": eps1,
            "clipping_threshold": clipping_threshold,
            "weight_decay": weight_decay,
            "min_dim_size_to_factor": min_dim_size_to_factor,
            "multiply_by_parameter_scale": multiply_by_parameter_scale,
            "eps2": eps2,
            "initial_step": initial_step,
        }
        super().__init__(params, defaults)

    @staticmethod
    def is_factored(shape: torch.Size | tuple[int, ...], min_dim_size_to_factor: int = 128) -> bool:
        """Whether a parameter of this shape gets a factored second moment.

        Args:
            shape: The parameter's shape.
            min_dim_size_to_factor: Both of the last two dims must be at least this.

        Returns:
            True for tensors of rank >= 2 whose last two dims are both large enough.
        """
        return len(shape) >= 2 and shape[-1] >= min_dim_size_to_factor and shape[-2] >= min_dim_size_to_factor

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # An int step round-trips through torch.save(weights_only=True) and never loses precision.
            state["step"] = 0
            kw: dict[str, Any] = {"dtype": _compute_dtype(p.dtype), "device": p.device}
            if self.is_factored(p.shape, group["min_dim_size_to_factor"]):
                state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **kw)
                state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **kw)
            else:
                state["exp_avg_sq"] = torch.zeros(p.shape, **kw)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                if not p.is_floating_point():
                    raise RuntimeError(f"Adafactor needs floating-point parameters, got {p.dtype}")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if hasattr(p, "full_tensor"):  # an FSDP2 shard (DTensor)
            self._update_sharded(p, group)
            return
        state = self._init_state(p, group)
        state["step"] += 1  # updates applied by this optimizer; T5X's counter is initial_step + this
        t = group["initial_step"] + state["step"]
        beta2 = 1.0 - float(t) ** (-group["decay_rate"])
        dtype = _compute_dtype(p.dtype)
        g = p.grad.to(dtype)
        g2 = g * g + group["eps1"]
        if "exp_avg_sq_row" in state:
            v_r, v_c = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            v_r.mul_(beta2).add_(g2.mean(dim=-1), alpha=1.0 - beta2)
            v_c.mul_(beta2).add_(g2.mean(dim=-2), alpha=1.0 - beta2)
            # Shazeer & Stern's rank-1 estimate: normalising the row factor makes outer(r, c) keep the
            # scale of the column means, i.e. v_hat[i, j] = r[i] * c[j] / mean(r).
            r = v_r / v_r.mean(dim=-1, keepdim=True)
            u = g * torch.rsqrt(r.unsqueeze(-1) * v_c.unsqueeze(-2))
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2).add_(g2, alpha=1.0 - beta2)
            u = g * torch.rsqrt(v)
        if group["clipping_threshold"] is not None:
            u.div_(torch.clamp(_rms(u) / group["clipping_threshold"], min=1.0))
        p_full = p.to(dtype)
        lr = group["lr"]
        if group["multiply_by_parameter_scale"]:
            lr = lr * torch.clamp(_rms(p_full), min=group["eps2"])
        # Decoupled decay: (1 - wd) * p, deliberately NOT (1 - lr * wd) * p as in torch/transformers.
        new = p_full * (1.0 - group["weight_decay"]) - lr * u
        p.copy_(new)

    def _update_sharded(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Update an FSDP2-sharded parameter on its full value.

        The RMS clip and the factored column statistics span every shard, so each rank gathers the
        parameter and its gradient, runs the same update, and keeps its own shard. The factored
        moments are vectors, so holding them whole on each rank costs little.
        """
        from torch.distributed.tensor import distribute_tensor

        full = p.full_tensor()
        full.grad = p.grad.full_tensor()
        self.state[full] = self.state.pop(p, {})
        self._update(full, group)
        self.state[p] = self.state.pop(full)
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, keeping the second moments in float32 (float64 for float64 parameters).

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
        dtype, which would round bf16 parameters' moments to bf16; this restores the saved values, copied.

        Args:
            state_dict: As returned by ``state_dict()``.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            # A checkpoint written before initial_step existed counted from 0.
            group.setdefault("initial_step", 0)
        saved_state = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for saved_id, p in zip(saved_group["params"], group["params"], strict=True):
                if saved_id not in saved_state:
                    continue
                for key, value in saved_state[saved_id].items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        # A copy, so that two optimizers loaded from one dict never share moments.
                        self.state[p][key] = value.to(
                            device=p.device, dtype=_compute_dtype(p.dtype), copy=True
                        )


def linear_warmup_decay(warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """The lr multiplier of linear warmup then linear decay, as a function of optimizer steps taken.

    Multiplier ``s / warmup_steps`` for ``s < warmup_steps``, then falling linearly from 1 to 0 at
    ``s = total_steps`` (and staying 0 after), or staying 1 when ``total_steps`` is None.

    Args:
        warmup_steps: Optimizer steps of warmup; 0 for none.
        total_steps: Optimizer step at which the multiplier reaches 0; None for no decay.

    Returns:
        A function suitable for ``torch.optim.lr_scheduler.LambdaLR``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if total_steps is None:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _constant(_: int) -> float:
    return 1.0


def build_optimizer(
    name: str,
    params: ParamsT,
    lr: float,
    weight_decay: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    initial_step: int = 0,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """Build an optimizer and its learning-rate schedule by name.

    * ``adafactor``: ours (T5X semantics, decoupled decay), constant learning rate as in the paper.
    * ``adafactor_hf``: ``transformers.optimization.Adafactor`` with ``scale_parameter=False``,
      ``relative_step=False``, ``warmup_init=False``, as an earlier replication ran it (its decay is
      multiplied by lr); constant learning rate.
    * ``adamw`` (alias ``adam``): ``torch.optim.AdamW`` with linear warmup over ``warmup_steps`` and, when
      ``total_steps`` is given, linear decay to 0 at ``total_steps``.

    The schedule counts optimizer steps: call ``scheduler.step()`` once after each ``optimizer.step()``,
    not once per example or micro-batch. ``warmup_steps`` and ``total_steps`` only shape the ``adamw``
    schedule; the Adafactor variants keep the paper's constant rate.

    Args:
        name: One of ``adafactor``, ``adafactor_hf``, ``adamw``, ``adam`` (case-insensitive).
        params: Parameters or parameter groups to optimize.
        lr: Peak learning rate.
        weight_decay: Weight decay, in the chosen optimizer's own convention.
        warmup_steps: Optimizer steps of linear warmup (``adamw`` only).
        total_steps: Optimizer steps after which the ``adamw`` rate reaches 0; None keeps it constant.
        initial_step: ``adafactor`` only: the step count of the checkpoint training starts from, which sets
            the second-moment decay as T5X's continued counter did (1,100,000 for the LM-adapted T5 1.1
            checkpoints that prompt tuning starts from; 0 for textbook Adafactor). The others ignore it.

    Returns:
        The optimizer and a ``LambdaLR`` scheduler wrapping it.

    Raises:
        ConfigError: For an unknown name or a negative or inconsistent value, listing every problem.
    """
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    problems: list[str] = []
    if key not in OPTIMIZER_NAMES:
        allowed = ", ".join([*OPTIMIZER_NAMES, *_ALIASES])
        problems.append(f"optimizer {name!r} is unknown (allowed: {allowed})")
    if not (math.isfinite(lr) and lr >= 0):
        problems.append(f"learning rate must be a finite number >= 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        problems.append(f"weight decay must be a finite number >= 0, got {weight_decay}")
    elif key == "adafactor" and weight_decay >= 1:
        # Decoupled decay multiplies p by (1 - wd) every step, so wd >= 1 would zero or flip the weights.
        problems.append(f"adafactor weight decay is decoupled from lr and must be < 1, got {weight_decay}")
    if isinstance(initial_step, bool) or not isinstance(initial_step, int) or initial_step < 0:
        problems.append(f"initial step must be an integer >= 0, got {initial_step!r}")
    if warmup_steps < 0:
        problems.append(f"warmup steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < max(1, warmup_steps):
        problems.append(f"total steps must be >= max(1, warmup steps = {warmup_steps}), got {total_steps}")
    if problems:
        raise ConfigError("; ".join(problems) + ".")

    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float] = _constant
    if key == "adafactor":
        optimizer = Adafactor(params, lr=lr, weight_decay=weight_decay, initial_step=initial_step)
    elif key == "adafactor_hf":
        from transformers.optimization import Adafactor as HFAdafactor

        optimizer = HFAdafactor(
            params,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=weight_decay,
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        schedule = linear_warmup_decay(warmup_steps, total_steps)
    return optimizer, LambdaLR(optimizer, schedule)
