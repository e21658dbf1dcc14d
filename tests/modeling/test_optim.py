"""Adafactor against updates computed by hand in the test (the optimizer/schedule factory: test_optim_build.py)."""

from __future__ import annotations

import io

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.modeling.optim import Adafactor, build_optimizer

F64 = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-14}


# ---------------------------------------------------------------- an independent reference, in float64


def ref_beta2(t: int) -> float:
    return 1.0 - t**-0.8


def ref_rms(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(x * x))


def ref_run(
    p0: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    lr: float = 0.3,
    wd: float = 0.0,
    factored: bool = False,
    clip: bool = True,
    lr_scaled_decay: bool = False,
    param_scale: bool = False,
    initial_step: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """The T5X rule written out with plain ops; returns the final param and RMS(u) before clipping per step."""
    p = p0.clone()
    eps1 = 1e-30
    v = torch.zeros_like(p)
    vr = torch.zeros(p.shape[:-1], dtype=p.dtype)
    vc = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype)
    raw_rms = []
    for t, g in enumerate(grads, start=initial_step + 1):
        b = ref_beta2(t)
        g2 = g**2 + eps1
        if factored:
            vr = b * vr + (1 - b) * g2.mean(-1)
            vc = b * vc + (1 - b) * g2.mean(-2)
            v_hat = vr[..., :, None] * vc[..., None, :] / vr.mean(-1)[..., None, None]
            u = g / torch.sqrt(v_hat)
        else:
            v = b * v + (1 - b) * g2
            u = g / torch.sqrt(v)
        raw_rms.append(float(ref_rms(u)))
        if clip:
            u = u / max(1.0, float(ref_rms(u)) / 1.0)
        step_lr = lr * max(1e-3, float(ref_rms(p))) if param_scale else lr
        decay = step_lr * wd if lr_scaled_decay else wd
        p = (1 - decay) * p - step_lr * u
    return p, raw_rms


def run_ours(p0: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, Adafactor]:
    param = torch.nn.Parameter(p0.clone())
    opt = Adafactor([param], **kwargs)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    return param.detach(), opt


def grads_for(shape: tuple[int, ...], n: int, seed: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) * (0.5 + i) for i in range(n)]


def param_for(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.5


# ---------------------------------------------------------------- (a) unfactored prompt, decoupled decay


@pytest.mark.parametrize("n_steps", [1, 5])
def test_unfactored_prompt_decoupled_weight_decay(n_steps: int) -> None:
    p0 = param_for((100, 64), seed=0)
    grads = grads_for((100, 64), n_steps, seed=1)
    ours, opt = run_ours(p0, grads, lr=0.3, weight_decay=1e-5)
    expected, _ = ref_run(p0, grads, lr=0.3, wd=1e-5)
    torch.testing.assert_close(ours, expected, **TIGHT)

    # The lr-scaled decay that torch/transformers use gives a measurably different answer: decay 0.3e-5
    # instead of 1e-5 per step, i.e. a gap of about 0.7e-5 * |p| per step, far above the tolerance.
    lr_scaled, _ = ref_run(p0, grads, lr=0.3, wd=1e-5, lr_scaled_decay=True)
    gap = (lr_scaled - expected).abs().max().item()
    assert gap > 1e-6 * n_steps
    assert (ours - lr_scaled).abs().max().item() == pytest.approx(gap, rel=1e-6)

    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"] == n_steps
    assert set(state) == {"step", "exp_avg_sq"}
    assert state["exp_avg_sq"].shape == (100, 64)


def test_first_step_is_lr_times_sign_of_gradient() -> None:
    # beta2 = 0 at t = 1, so v = g^2 + eps1 and u = sign(g): the first move is exactly -lr * sign(g).
    p0 = param_for((100, 64), seed=2)
    grads = grads_for((100, 64), 1, seed=3)
    ours, _ = run_ours(p0, grads, lr=0.3)
    torch.testing.assert_close(ours, p0 - 0.3 * torch.sign(grads[0]), **TIGHT)


def test_large_weight_decay_is_not_multiplied_by_lr() -> None:
    p0 = param_for((10, 20), seed=4)
    grads = [torch.zeros_like(p0) + 1e-3]
    ours, _ = run_ours(p0, grads, lr=0.3, weight_decay=0.1)
    # u = sign(g) = 1 everywhere, so p1 = 0.9 * p0 - 0.3 exactly; the lr-scaled rule would give 0.97 * p0 - 0.3.
    torch.testing.assert_close(ours, 0.9 * p0 - 0.3, **TIGHT)
    assert (ours - (0.97 * p0 - 0.3)).abs().max().item() > 1e-3


# ---------------------------------------------------------------- (b) factored second moments


@pytest.mark.parametrize("n_steps", [1, 5])
def test_factored_matrix(n_steps: int) -> None:
    p0 = param_for((128, 256), seed=5)
    grads = grads_for((128, 256), n_steps, seed=6)
    ours, opt = run_ours(p0, grads, lr=0.3, weight_decay=1e-5)
    expected, _ = ref_run(p0, grads, lr=0.3, wd=1e-5, factored=True)
    torch.testing.assert_close(ours, expected, **TIGHT)
    # The factored estimate is a real approximation: the unfactored rule lands elsewhere.
    unfactored, _ = ref_run(p0, grads, lr=0.3, wd=1e-5, factored=False)
    assert (unfactored - expected).abs().max().item() > 1e-3

    state = opt.state[opt.param_groups[0]["params"][0]]
    assert set(state) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert state["exp_avg_sq_row"].shape == (128,)
    assert state["exp_avg_sq_col"].shape == (256,)
    # After one step the row/col moments are exactly the row/col means of g^2 + eps1.
    if n_steps == 1:
        torch.testing.assert_close(state["exp_avg_sq_row"], (grads[0] ** 2 + 1e-30).mean(-1), **TIGHT)
        torch.testing.assert_close(state["exp_avg_sq_col"], (grads[0] ** 2 + 1e-30).mean(-2), **TIGHT)


def test_three_dim_tensor_factors_over_last_two_dims() -> None:
    p0 = param_for((3, 128, 130), seed=7)
    grads = grads_for((3, 128, 130), 3, seed=8)
    ours, opt = run_ours(p0, grads, lr=0.1)
    expected, _ = ref_run(p0, grads, lr=0.1, factored=True)
    torch.testing.assert_close(ours, expected, **TIGHT)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg_sq_row"].shape == (3, 128)
    assert state["exp_avg_sq_col"].shape == (3, 130)


@pytest.mark.parametrize(
    ("shape", "factored"),
    [
        ((100, 768), False),  # a prompt: 100 < 128, keeps the full second moment
        ((768, 3072), True),
        ((128, 128), True),
        ((127, 4096), False),
        ((4096, 127), False),
        ((32128,), False),
        ((2, 128, 128), True),
        ((128, 128, 2), False),
        ((), False),
    ],
)
def test_which_shapes_are_factored(shape: tuple[int, ...], factored: bool) -> None:
    assert Adafactor.is_factored(torch.Size(shape)) is factored


def test_min_dim_size_to_factor_is_honoured() -> None:
    param = torch.nn.Parameter(torch.ones(8, 8))
    opt = Adafactor([param], min_dim_size_to_factor=8)
    param.grad = torch.ones(8, 8)
    opt.step()
    assert "exp_avg_sq_row" in opt.state[param]


# ---------------------------------------------------------------- (c) update clipping


def test_update_clipping_kicks_in_when_rms_exceeds_one() -> None:
    p0 = param_for((100, 64), seed=9)
    gen = torch.Generator().manual_seed(10)
    # A small gradient then a 100x larger one: v still remembers the small one at t = 2
    # (beta2 = 1 - 2**-0.8 = 0.43), so |u| is about 1 / sqrt(0.57) = 1.32 > 1 and clipping must act.
    grads = [
        torch.randn(100, 64, generator=gen, dtype=F64) * 0.01,
        torch.randn(100, 64, generator=gen, dtype=F64),
    ]
    expected, raw_rms = ref_run(p0, grads)
    assert raw_rms[1] > 1.3
    ours, _ = run_ours(p0, grads)
    torch.testing.assert_close(ours, expected, **TIGHT)
    unclipped, _ = ref_run(p0, grads, clip=False)
    assert (unclipped - expected).abs().max().item() > 1e-2
    # Disabling clipping in the optimizer reproduces the unclipped rule.
    ours_unclipped, _ = run_ours(p0, grads, clipping_threshold=None)
    torch.testing.assert_close(ours_unclipped, unclipped, **TIGHT)


def test_update_clipping_is_a_no_op_when_rms_is_below_one() -> None:
    p0 = param_for((100, 64), seed=11)
    gen = torch.Generator().manual_seed(12)
    # A large gradient then a 100x smaller one: RMS(u) is well below 1, so clipping must change nothing.
    grads = [
        torch.randn(100, 64, generator=gen, dtype=F64),
        torch.randn(100, 64, generator=gen, dtype=F64) * 0.01,
    ]
    expected, raw_rms = ref_run(p0, grads)
    assert raw_rms[1] < 0.5
    ours, _ = run_ours(p0, grads)
    unclipped, _ = ref_run(p0, grads, clip=False)
    torch.testing.assert_close(ours, expected, **TIGHT)
    torch.testing.assert_close(ours, unclipped, **TIGHT)


def test_clipping_on_a_factored_first_step() -> None:
    # A rank-1 estimate of a very non-rank-1 g^2 leaves RMS(u) > 1 even on the first step.
    g = torch.ones(128, 128, dtype=F64)
    g[:64, :64] = 100.0
    p0 = param_for((128, 128), seed=13)
    expected, raw_rms = ref_run(p0, [g], factored=True)
    assert raw_rms[0] > 1.0
    ours, _ = run_ours(p0, [g])
    torch.testing.assert_close(ours, expected, **TIGHT)


# ---------------------------------------------------------------- (d) 1-D bias and parameter scaling


@pytest.mark.parametrize("n_steps", [1, 5])
def test_bias_vector(n_steps: int) -> None:
    p0 = param_for((512,), seed=14)
    grads = grads_for((512,), n_steps, seed=15)
    ours, opt = run_ours(p0, grads, lr=0.3, weight_decay=1e-3)
    expected, _ = ref_run(p0, grads, lr=0.3, wd=1e-3)
    torch.testing.assert_close(ours, expected, **TIGHT)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"].shape == (512,)


def test_multiply_by_parameter_scale() -> None:
    p0 = param_for((100, 64), seed=16)
    grads = grads_for((100, 64), 4, seed=17)
    ours, _ = run_ours(p0, grads, lr=0.3, weight_decay=1e-4, multiply_by_parameter_scale=True)
    expected, _ = ref_run(p0, grads, lr=0.3, wd=1e-4, param_scale=True)
    torch.testing.assert_close(ours, expected, **TIGHT)
    # A zero parameter moves by lr * eps2 = 3e-4 per element, not by 0.
    zero, _ = run_ours(
        torch.zeros(4, 4, dtype=F64), [torch.ones(4, 4, dtype=F64)], multiply_by_parameter_scale=True
    )
    torch.testing.assert_close(zero, torch.full((4, 4), -3e-4, dtype=F64), **TIGHT)


def test_param_groups_and_missing_grads() -> None:
    a = torch.nn.Parameter(param_for((6,), seed=18))
    b = torch.nn.Parameter(param_for((6,), seed=19))
    frozen = torch.nn.Parameter(param_for((6,), seed=20))
    a0, b0, f0 = a.detach().clone(), b.detach().clone(), frozen.detach().clone()
    opt = Adafactor([{"params": [a, frozen]}, {"params": [b], "lr": 0.01}], lr=0.3)
    a.grad = torch.ones(6, dtype=F64)
    b.grad = -torch.ones(6, dtype=F64)
    opt.step()
    torch.testing.assert_close(a.detach(), a0 - 0.3, **TIGHT)
    torch.testing.assert_close(b.detach(), b0 + 0.01, **TIGHT)
    assert torch.equal(frozen.detach(), f0)
    assert frozen not in opt.state


def test_closure_loss_is_returned() -> None:
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    opt = Adafactor([w], lr=0.5)

    def closure() -> float:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss.item()

    assert opt.step(closure) == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([1.5, -0.5]), rtol=0, atol=1e-7)


def test_agrees_with_transformers_adafactor_except_for_decay() -> None:
    # On a 1-D parameter both implementations run the same unfactored rule; only the decay differs.
    from transformers.optimization import Adafactor as HFAdafactor

    p0 = param_for((300,), seed=21, dtype=torch.float32)
    grads = grads_for((300,), 5, seed=22, dtype=torch.float32)
    for wd in (0.0, 0.05):
        ours, _ = run_ours(p0, grads, lr=0.3, weight_decay=wd)
        hf_param = torch.nn.Parameter(p0.clone())
        hf = HFAdafactor([hf_param], lr=0.3, scale_parameter=False, relative_step=False, weight_decay=wd)
        for g in grads:
            hf_param.grad = g.clone()
            hf.step()
        expected_hf, _ = ref_run(
            p0.double(), [g.double() for g in grads], lr=0.3, wd=wd, lr_scaled_decay=True
        )
        torch.testing.assert_close(hf_param.detach().double(), expected_hf, rtol=1e-5, atol=1e-6)
        if wd == 0.0:
            torch.testing.assert_close(ours, hf_param.detach(), rtol=1e-5, atol=1e-6)
        else:
            assert (ours - hf_param.detach()).abs().max().item() > 1e-3


# ---------------------------------------------------------------- dtypes and state round trip


def test_bf16_param_keeps_float32_state() -> None:
    p0 = param_for((100, 64), seed=23, dtype=torch.float32)
    grads = grads_for((100, 64), 3, seed=24, dtype=torch.float32)
    param = torch.nn.Parameter(p0.to(torch.bfloat16))
    opt = Adafactor([param], lr=0.3, weight_decay=1e-2)
    expected = p0.to(torch.bfloat16).double()
    v = torch.zeros(100, 64, dtype=F64)
    for t, g in enumerate(grads, start=1):
        g_bf16 = g.to(torch.bfloat16)
        param.grad = g_bf16
        opt.step()
        # Reference: the bf16 param and grad are widened, updated in high precision, rounded back to bf16.
        gd = g_bf16.double()
        v = ref_beta2(t) * v + (1 - ref_beta2(t)) * (gd**2 + 1e-30)
        u = gd / torch.sqrt(v)
        u = u / max(1.0, float(ref_rms(u)))
        expected = ((1 - 1e-2) * expected - 0.3 * u).to(torch.bfloat16).double()
    assert param.dtype == torch.bfloat16
    assert opt.state[param]["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(opt.state[param]["exp_avg_sq"].double(), v, rtol=1e-6, atol=0)
    # One bf16 ulp at most (float32 vs float64 arithmetic can round differently).
    torch.testing.assert_close(param.detach().double(), expected, rtol=2**-7, atol=1e-6)


def _model() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(25)
    return [
        torch.nn.Parameter(torch.randn(20, 16, generator=gen)),  # prompt-like, unfactored
        torch.nn.Parameter(torch.randn(128, 160, generator=gen)),  # factored
        torch.nn.Parameter(torch.randn(40, generator=gen)),  # bias
        torch.nn.Parameter(torch.randn(16, 8, generator=gen).to(torch.bfloat16)),  # bf16
    ]


def _grad_stream(n: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(26)
    shapes = [(20, 16), (128, 160), (40,), (16, 8)]
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(n)]


def _step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype)
    opt.step()


def test_state_dict_round_trip_is_bit_exact() -> None:
    stream = _grad_stream(5)
    params_a = _model()
    opt_a = Adafactor(params_a, lr=0.3, weight_decay=1e-5)
    for grads in stream[:3]:
        _step(opt_a, params_a, grads)

    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = Adafactor(params_b, lr=0.3, weight_decay=1e-5)
    opt_b.load_state_dict(loaded)
    for pb in params_b:
        assert opt_b.state[pb]["step"] == 3
        assert all(v.dtype == torch.float32 for v in opt_b.state[pb].values() if isinstance(v, torch.Tensor))

    for grads in stream[3:]:
        _step(opt_a, params_a, grads)
        _step(opt_b, params_b, grads)
    for pa, pb in zip(params_a, params_b, strict=True):
        assert torch.equal(pa, pb)
    # ...and the state really mattered: a fresh optimizer from the same point ends elsewhere.
    params_c = _model()
    opt_c = Adafactor(params_c, lr=0.3, weight_decay=1e-5)
    for grads in stream[:3]:
        _step(opt_c, params_c, grads)
    opt_c = Adafactor(params_c, lr=0.3, weight_decay=1e-5)
    for grads in stream[3:]:
        _step(opt_c, params_c, grads)
    assert not torch.equal(params_c[0], params_a[0])


def test_loading_a_state_dict_does_not_share_moments() -> None:
    params_a = _model()
    opt_a = Adafactor(params_a)
    _step(opt_a, params_a, _grad_stream(1)[0])
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = Adafactor(params_b)
    opt_b.load_state_dict(opt_a.state_dict())
    before = opt_a.state[params_a[0]]["exp_avg_sq"].clone()
    _step(opt_b, params_b, _grad_stream(2)[1])
    assert torch.equal(opt_a.state[params_a[0]]["exp_avg_sq"], before)


def test_constructor_rejects_bad_values() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in ({"lr": -1.0}, {"weight_decay": 1.0}, {"clipping_threshold": 0.0}, {"decay_rate": 0.0}):
        with pytest.raises(ValueError):
            Adafactor(p, **kwargs)


# ---------------------------------------------------------------- initial step: T5X's continued counter

LM_ADAPT_STEP = 1_100_000


def test_initial_step_decay_is_t5x_continued_counter() -> None:
    """At initial step N the k-th update decays with 1 - (N + k)^-0.8 (T5X: step restored, step_offset 0)."""
    p0 = param_for((100, 64), seed=20)
    grads = grads_for((100, 64), 6, seed=21)
    ours, opt = run_ours(p0, grads, lr=0.3, weight_decay=1e-5, initial_step=LM_ADAPT_STEP)
    expected, raw_rms = ref_run(p0, grads, lr=0.3, wd=1e-5, initial_step=LM_ADAPT_STEP)
    torch.testing.assert_close(ours, expected, **TIGHT)

    # The decays themselves: ~0.9999853 from the first update on, and the second moment starts at zero.
    assert ref_beta2(LM_ADAPT_STEP + 1) == pytest.approx(0.9999853, abs=1e-7)
    state = opt.state[opt.param_groups[0]["params"][0]]
    g2 = [g**2 + 1e-30 for g in grads]
    v = torch.zeros_like(p0)
    for k, g in enumerate(g2, start=1):
        b = 1.0 - (LM_ADAPT_STEP + k) ** -0.8
        v = b * v + (1 - b) * g
    torch.testing.assert_close(state["exp_avg_sq"], v, **TIGHT)
    assert state["step"] == 6 and opt.param_groups[0]["initial_step"] == LM_ADAPT_STEP

    # With v ~ 1.5e-5 g^2 the raw update has RMS in the hundreds, so clipping to RMS 1 acts at every step.
    assert all(r > 30 for r in raw_rms)
    from_zero, _ = ref_run(p0, grads, lr=0.3, wd=1e-5)
    assert (from_zero - expected).abs().max().item() > 1e-3  # the counter changes what is trained


def test_initial_step_each_update_has_rms_lr_and_decoupled_decay() -> None:
    """Clipped updates have RMS exactly 1, so each step moves p by (1 - wd) p - lr * u with RMS(u) = 1."""
    p0 = param_for((100, 64), seed=22)
    grads = grads_for((100, 64), 4, seed=23)
    param = torch.nn.Parameter(p0.clone())
    opt, _ = build_optimizer("adafactor", [param], lr=0.3, weight_decay=1e-5, initial_step=LM_ADAPT_STEP)
    before = p0.clone()
    for g in grads:
        param.grad = g.clone()
        opt.step()
        u = ((1 - 1e-5) * before - param.detach()) / 0.3
        assert float(ref_rms(u)) == pytest.approx(1.0, rel=1e-9)
        before = param.detach().clone()


def test_initial_step_factored_matrix_matches_reference() -> None:
    p0 = param_for((4, 8, 16), seed=24)
    grads = grads_for((4, 8, 16), 3, seed=25)
    ours, _ = run_ours(p0, grads, lr=0.1, min_dim_size_to_factor=8, initial_step=LM_ADAPT_STEP)
    expected, _ = ref_run(p0, grads, lr=0.1, factored=True, initial_step=LM_ADAPT_STEP)
    torch.testing.assert_close(ours, expected, **TIGHT)


def test_initial_step_survives_state_dict_round_trip() -> None:
    """Stop after 3 updates, save, load into a fresh optimizer built with initial_step 0: 3 more updates
    give the same result as 6 uninterrupted ones, because the saved param group carries initial_step."""
    p0 = param_for((100, 64), seed=26)
    grads = grads_for((100, 64), 6, seed=27)
    whole, _ = run_ours(p0, grads, lr=0.3, weight_decay=1e-5, initial_step=LM_ADAPT_STEP)

    first, opt = run_ours(p0, grads[:3], lr=0.3, weight_decay=1e-5, initial_step=LM_ADAPT_STEP)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    param = torch.nn.Parameter(first.clone())
    resumed = Adafactor([param], lr=0.3, weight_decay=1e-5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["initial_step"] == LM_ADAPT_STEP
    for g in grads[3:]:
        param.grad = g.clone()
        resumed.step()
    assert resumed.state[param]["step"] == 6
    torch.testing.assert_close(param.detach(), whole, **TIGHT)


def test_state_dict_without_initial_step_loads_as_zero() -> None:
    param = torch.nn.Parameter(param_for((3, 4), seed=28))
    opt = Adafactor([param])
    param.grad = torch.ones_like(param)
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["initial_step"]  # as written before the option existed
    fresh = Adafactor([param], initial_step=LM_ADAPT_STEP)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["initial_step"] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_initial_step_must_be_a_non_negative_integer(bad) -> None:
    with pytest.raises(ValueError, match="initial_step"):
        Adafactor([torch.nn.Parameter(torch.zeros(2))], initial_step=bad)
    with pytest.raises(ConfigError, match="initial step"):
        build_optimizer("adafactor", [torch.nn.Parameter(torch.zeros(2))], 0.3, 0.0, initial_step=bad)
