"""The optimizer/schedule factory: `build_optimizer` names, schedules, config errors and state round trips."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.modeling.optim import OPTIMIZER_NAMES, Adafactor, build_optimizer, linear_warmup_decay

# ---------------------------------------------------------------- build_optimizer and schedules


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, 4))]


def test_build_optimizer_names() -> None:
    from transformers.optimization import Adafactor as HFAdafactor

    assert OPTIMIZER_NAMES == ("adafactor", "adafactor_hf", "adamw")

    opt, _ = build_optimizer("adafactor", _params(), 0.3, 1e-5)
    assert type(opt) is Adafactor
    assert opt.defaults["lr"] == 0.3 and opt.defaults["weight_decay"] == 1e-5
    assert opt.defaults["multiply_by_parameter_scale"] is False

    opt, _ = build_optimizer("adafactor_hf", _params(), 0.3, 1e-5)
    assert type(opt) is HFAdafactor
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.3, 1e-5)
    assert (group["scale_parameter"], group["relative_step"], group["warmup_init"]) == (False, False, False)

    for name in ("adamw", "adam", " AdamW "):
        opt, _ = build_optimizer(name, _params(), 1e-3, 0.01)
        assert type(opt) is torch.optim.AdamW
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (1e-3, 0.01)


@pytest.mark.parametrize("name", ["adafactor", "adafactor_hf"])
def test_adafactor_schedules_are_constant(name: str) -> None:
    params = _params()
    opt, sched = build_optimizer(name, params, 0.3, 0.0, warmup_steps=10, total_steps=50)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        params[0].grad = torch.ones(3, 4)
        opt.step()
        sched.step()
    assert lrs == [0.3] * 60


def test_adamw_warmup_then_linear_decay_counts_optimizer_steps() -> None:
    params = _params()
    opt, sched = build_optimizer("adamw", params, 1e-3, 0.0, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(121):
        lrs.append(opt.param_groups[0]["lr"])
        params[0].grad = torch.ones(3, 4)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3, abs=1e-15)
    assert lrs[10] == pytest.approx(1e-3, abs=1e-15)
    assert max(lrs) == pytest.approx(1e-3, abs=1e-15)
    assert lrs[60] == pytest.approx(0.5e-3, abs=1e-15)
    assert lrs[109] == pytest.approx(1e-5, abs=1e-15)
    assert lrs[110] == 0.0 and lrs[120] == 0.0
    assert all(x <= y for x, y in itertools.pairwise(lrs[:11]))
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))


def test_adamw_without_schedule_is_constant_and_warmup_only_plateaus() -> None:
    params = _params()
    opt, sched = build_optimizer("adamw", params, 2e-4, 0.0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 2e-4
    factor = linear_warmup_decay(4, None)
    assert [factor(s) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_unknown_optimizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_optimizer("sgd", _params(), 0.1, 0.0)
    message = str(excinfo.value)
    assert "'sgd'" in message
    for allowed in ("adafactor", "adafactor_hf", "adamw", "adam"):
        assert allowed in message


def test_bad_values_are_all_reported_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_optimizer("adamw", _params(), -1.0, math.nan, warmup_steps=-2, total_steps=0)
    message = str(excinfo.value)
    for fragment in ("learning rate", "weight decay", "warmup steps", "total steps"):
        assert fragment in message
    with pytest.raises(ConfigError, match="decoupled"):
        build_optimizer("adafactor", _params(), 0.3, 1.0)
    with pytest.raises(ConfigError, match="total steps"):
        build_optimizer("adamw", _params(), 1e-3, 0.0, warmup_steps=20, total_steps=10)


@pytest.mark.parametrize("name", ["adafactor", "adafactor_hf", "adamw"])
def test_optimizer_and_scheduler_state_survive_weights_only_load(name: str) -> None:
    params = _params()
    opt, sched = build_optimizer(name, params, 1e-3, 0.0, warmup_steps=4, total_steps=20)
    for _ in range(3):
        params[0].grad = torch.ones(3, 4)
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    params_b = [torch.nn.Parameter(params[0].detach().clone())]
    opt_b, sched_b = build_optimizer(name, params_b, 1e-3, 0.0, warmup_steps=4, total_steps=20)
    opt_b.load_state_dict(saved["optimizer"])
    sched_b.load_state_dict(saved["scheduler"])
    assert sched_b.last_epoch == 3
    assert opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, o, s in ((params, opt, sched), (params_b, opt_b, sched_b)):
        p[0].grad = torch.full((3, 4), 0.5)
        o.step()
        s.step()
    assert torch.equal(params[0], params_b[0])
    assert sched_b.get_last_lr() == sched.get_last_lr()
