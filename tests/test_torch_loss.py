"""PreferenceLoss: finite differences for gradients, extreme inputs, dtypes, reductions and input errors."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import mpmath
import pytest
import torch

import dpalogic
from dpalogic import DegenerateStructureError, DPALogicError, PreferenceLoss
from dpalogic.compile.codegen import module_for
from dpalogic.semantics.catalog import entries, lookup, pair_names

NAMES = pair_names()  # the calls below pass chosen/rejected; TPO's [B, 3] form is checked in test_tpo.py


def inputs(B=6, seed=0, dtype=torch.float64, low=-30.0):
    g = torch.Generator().manual_seed(seed)
    lp = [(torch.rand(B, generator=g, dtype=torch.float64) * low).to(dtype) for _ in range(4)]
    lengths = [torch.randint(1, 40, (B,), generator=g) for _ in range(2)]
    return lp, lengths


def call(loss_fn, lp, lengths):
    return loss_fn(*lp, chosen_lengths=lengths[0], rejected_lengths=lengths[1])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    lp, lengths = inputs(B=4, seed=1, low=-6.0)
    loss_fn = PreferenceLoss(name, reduction="sum")
    leaves = [x.clone().requires_grad_() for x in lp]

    def f(*xs):
        return call(loss_fn, list(xs), lengths)

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


EXTREMES = torch.tensor([0.0, -1e-12, -1e-6, -1e-3, -0.5, -0.6931, -0.7, -5.0, -80.0, -700.0, -1e3, -1e4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_finite_values_and_gradients_at_extremes(name, dtype):
    # every combination of extreme chosen/rejected values, with the reference at extremes too
    n = len(EXTREMES)
    c = EXTREMES.repeat_interleave(n)
    r = EXTREMES.repeat(n)
    rc, rr = r.flip(0), c.flip(0)
    leaves = [x.to(dtype).clone().requires_grad_() for x in (c, r, rc, rr)]
    lengths = [torch.full((n * n,), 3), torch.full((n * n,), 7)]
    out = call(PreferenceLoss(name, reduction="none"), leaves, lengths)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    for x in leaves:
        if x.grad is not None:
            assert torch.isfinite(x.grad.float()).all()


def test_orpo_finite_at_log_prob_zero():
    # ORPO's classic NaN: log(1 - p) at p = 1
    c = torch.tensor([0.0, -1e-9], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-2.0, 0.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([1, 1])
    loss = PreferenceLoss("orpo", alpha=0.0, reduction="none")(c, r, chosen_lengths=n, rejected_lengths=n)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)  # p_w = 1: ρ = ∞, the loss vanishes


def test_log1mexp_accuracy_and_gradient():
    """The one torch log1mexp (the generated modules' helper, which PreferenceLoss runs) against mpmath."""
    from dpalogic.compile.codegen import module_for

    log1mexp = module_for(entries()["orpo"].program)._log1mexp
    x = torch.tensor([-1e-20, -1e-10, -1e-3, -0.69, -0.7, -1.0, -30.0, -1e4], dtype=torch.float64)
    y, dy = log1mexp(x, torch.finfo(torch.float64).tiny)
    mpmath.mp.dps = 60  # high-precision reference
    want = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()]
    torch.testing.assert_close(y, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    want_grad = [float(-mpmath.exp(mpmath.mpf(v)) / (1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()]
    torch.testing.assert_close(dy, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-9, atol=0)


def test_bf16_accumulates_in_float32():
    lp, lengths = inputs(B=32, seed=3, dtype=torch.bfloat16)
    got = call(PreferenceLoss("simpo"), lp, lengths)
    want = call(PreferenceLoss("simpo"), [x.double() for x in lp], lengths)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_reductions():
    lp, lengths = inputs(B=5, seed=4)
    per = call(PreferenceLoss("cpo", reduction="none"), lp, lengths)
    assert per.shape == (5,)
    assert call(PreferenceLoss("cpo", reduction="sum"), lp, lengths).item() == pytest.approx(per.sum().item())
    assert call(PreferenceLoss("cpo"), lp, lengths).item() == pytest.approx(per.mean().item())


def test_alpha_zero_leaves_the_preference_term_alone():
    lp, lengths = inputs(B=5, seed=5)
    with_nll = call(PreferenceLoss("cpo", alpha=1.0, reduction="none"), lp, lengths)
    without = call(PreferenceLoss("cpo", alpha=0.0, reduction="none"), lp, lengths)
    nll = -lp[0] / lengths[0].double()
    torch.testing.assert_close(with_nll - without, nll, rtol=1e-10, atol=1e-12)
    # alpha=0 needs no lengths: the only normalized term is gone
    PreferenceLoss("cpo", alpha=0.0)(lp[0], lp[1])


def test_structure_text_defaults_beta_one_gamma_zero():
    lp, _ = inputs(B=5, seed=6)
    pw, pl = lp[0].exp(), lp[1].exp()
    got = PreferenceLoss("(M(yl) -> M(yw), M(yw) | M(yl))", reduction="none")(lp[0], lp[1])
    want = -torch.log(pw / (pw + pl * (1 - pw)))  # cCPO: ρ = pw / (pl (1 − pw))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    got2 = PreferenceLoss("(M(yl) -> M(yw), M(yw) | M(yl))", beta=0.5, gamma=0.3, reduction="none")(lp[0], lp[1])
    rho = pw / (pl * (1 - pw))
    torch.testing.assert_close(got2, torch.nn.functional.softplus(-(0.5 * rho.log() - 0.3)), rtol=1e-9, atol=1e-12)


def test_program_and_structure_specs():
    from dpalogic import Structure

    lp, lengths = inputs(B=3, seed=7)
    prog = entries()["dpo"].program
    a = call(PreferenceLoss(prog), lp, lengths)
    b = call(PreferenceLoss("dpo"), lp, lengths)
    assert a.item() == pytest.approx(b.item())
    s = Structure.parse("M(yw) & ~M(yl)")
    c = PreferenceLoss(s)(lp[0], lp[1])
    want = -(lp[0] + torch.log1p(-lp[1].exp())).mean()
    assert c.item() == pytest.approx(want.item(), rel=1e-9)


@pytest.mark.parametrize(
    "spec,kwargs,fragment",
    [
        ("dpoo", {}, "did you mean 'dpo'"),
        ("kto", {"betaa": 0.1}, "did you mean 'beta'"),  # trainable without a structure, same checks
        ("dpo", {"betaa": 0.1}, "did you mean 'beta'"),
        ("(M(yw), false)", {}, "literally 'false'"),
        ("M(yw) & ~M(yw)", {}, "✓ side"),
        ("M(yw) | ~M(yw)", {}, "✗ side"),
        ("dpo", {"reduction": "avg"}, "reduction"),
    ],
)
def test_bad_specs_are_reported(spec, kwargs, fragment):
    with pytest.raises(DPALogicError, match=None) as info:
        PreferenceLoss(spec, **kwargs)
    assert fragment in str(info.value)


def test_degenerate_is_its_own_error_type():
    with pytest.raises(DegenerateStructureError):
        PreferenceLoss("M(yw) & ~M(yw)")


def test_missing_inputs_are_reported():
    lp, _ = inputs(B=2)
    with pytest.raises(DPALogicError, match="ref_chosen_logps"):
        PreferenceLoss("dpo")(lp[0], lp[1])
    with pytest.raises(DPALogicError, match="chosen_lengths"):
        PreferenceLoss("simpo")(lp[0], lp[1])
    with pytest.raises(DPALogicError, match=r"logps\['M\(y3\)'\]"):
        PreferenceLoss("M(y3) -> M(y1)")(logps={"M(y1)": lp[0]})


@pytest.mark.parametrize(
    "spec,hp,fragment",
    [
        ("ipo", {"beta": 0}, "not a finite number"),
        ("robust", {"label_smoothing": 0.5}, "not a finite number"),
        ("exo_pair", {"label_smoothing": 0.0}, "strictly between 0 and 1"),
        ("discopop", {"discopop_tau": 0.0}, "must be positive"),
        ("dpo", {"beta": "abc"}, "must be a number"),
    ],
)
def test_hyperparameters_out_of_range_are_reported_at_construction(spec, hp, fragment):
    with pytest.raises(DPALogicError) as info:
        PreferenceLoss(spec, **hp)
    assert fragment in str(info.value)


NEAR_ZERO = torch.tensor([-1e-7, -1e-6, -3e-6, -1e-5, -1e-4, -0.01, -1.0, -20.0])


@pytest.mark.parametrize("backend", ["torch", "generated twin"])
@pytest.mark.parametrize("name", ["ceunl", "orpo", "cunl", "uncpo", "modified_dpo"])
def test_float16_gradients_saturate_instead_of_overflowing(name, backend):
    """Near log p = 0 the exact gradient (about 1/|log p|) exceeds float16's range: it saturates at ±65504."""
    n = len(NEAR_ZERO)
    grid = [NEAR_ZERO.repeat_interleave(n), NEAR_ZERO.repeat(n)]
    grid += [grid[1].flip(0), grid[0].flip(0)]  # the reference, also near 0
    lengths = [torch.full((n * n,), 1), torch.full((n * n,), 1)]
    loss_fn = PreferenceLoss(name, reduction="sum")
    half = [x.to(torch.float16).requires_grad_() for x in grid]
    exact = [x.detach().double().requires_grad_() for x in half]  # the same inputs, in float64
    call(loss_fn, exact, lengths).backward()
    if backend == "torch":
        call(loss_fn, half, lengths).backward()
    else:
        from dpalogic.compile.codegen import module_for

        mod = module_for(loss_fn.program)
        args = {"M(yw)": half[0], "M(yl)": half[1], "Ref(yw)": half[2], "Ref(yl)": half[3]}
        counts = [torch.ones(n * n, dtype=torch.long) for _ in mod.LENGTHS]
        mod.per_pair_loss(*[args[a] for a in mod.ATOMS], *counts, backend="torch").sum().backward()
    big = torch.finfo(torch.float16).max
    saturated = 0
    for h, e in zip(half, exact):
        if e.grad is None:
            continue
        assert h.grad.dtype == torch.float16 and torch.isfinite(h.grad).all()
        want = e.grad.clamp(-big, big)
        torch.testing.assert_close(h.grad.double(), want, rtol=2e-2, atol=1e-3)
        saturated += int((e.grad.abs() > big).sum())
    assert saturated > 0  # the grid does reach the saturation


def test_positive_log_probabilities_are_refused():
    a = -torch.rand(4, dtype=torch.float64)
    loss_fn = PreferenceLoss("dpo")
    with pytest.raises(DPALogicError, match="log-probabilities must be <= 0.*M\\(yl\\).*0.5"):
        loss_fn(a, torch.tensor([-1.0, 0.5, -2.0, -3.0], dtype=torch.float64), a, a)
    # rounding noise just above 0 (a log-softmax sum in low precision) is accepted as log p = 0
    assert torch.isfinite(loss_fn(a, torch.full_like(a, 1e-4), a, a))


def test_a_nan_does_not_hide_a_positive_log_prob_and_unused_inputs_are_checked():
    """A NaN in one input (its max is NaN) leaves the other inputs' check intact; log-probs given but not used (a
    reference passed to a reference-free loss) are still refused when positive."""
    a = -torch.rand(4, dtype=torch.float64)
    probs = torch.rand(4, dtype=torch.float64) * 0.5 + 0.2
    with pytest.raises(DPALogicError, match=r"chosen_logps \(log M\(yw\)\)"):
        PreferenceLoss("dpo")(probs, a, torch.full_like(a, float("nan")), a)
    with pytest.raises(DPALogicError, match=r"Ref\(yw\)"):
        PreferenceLoss("simpo")(a, a, probs, a, torch.ones(4), torch.ones(4))
    with pytest.raises(DPALogicError, match=r"Ref\(yw\)"):
        PreferenceLoss("cpo")(a, a, logps={"Ref(yw)": probs})
    lp = -torch.rand(3, 20, dtype=torch.float64)
    lp[0, 3] = float("nan")
    with pytest.raises(DPALogicError, match="ref_logps"):
        PreferenceLoss("(M(y1), ExactlyOne(M(y1..y20)))")(logps=lp, ref_logps=torch.rand_like(lp) + 0.5)


def test_validate_false_skips_the_value_check_only():
    """validate=False runs no max over the inputs: a positive log-prob then goes into DPO's closed form as it is;
    shapes are still checked. The generated module checks its own inputs and names the argument."""
    g = torch.Generator().manual_seed(4)
    w, lo, rw, rl = (-torch.rand(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    lo[1] = 0.5
    unchecked = PreferenceLoss("dpo", beta=0.2, reduction="none", validate=False)
    z = 0.2 * ((w - rw) - (lo - rl))
    torch.testing.assert_close(unchecked(w, lo, rw, rl), torch.nn.functional.softplus(-z), rtol=1e-14, atol=0)
    with pytest.raises(DPALogicError, match="same shape"):
        unchecked(w, lo[:3], rw, rl)
    mod = module_for(lookup("dpo").program)
    with pytest.raises(DPALogicError, match=r"rejected_logps \(log M\(yl\)\) has 0\.5"):
        mod.per_pair_loss(w, lo, rw, rl, validate=True)
    # the raw module checks nothing unless asked, as TRL's and Liger's expressions
    torch.testing.assert_close(mod.per_pair_loss(w, lo, rw, rl, beta=0.2), unchecked(w, lo, rw, rl))


def test_inputs_are_checked():
    a = -torch.rand(4, dtype=torch.float64)
    loss_fn = PreferenceLoss("dpo", reduction="none")
    with pytest.raises(DPALogicError, match="same shape"):
        loss_fn(a[:, None], a, a, a)  # would broadcast to [4, 4] silently
    with pytest.raises(DPALogicError, match="torch.Tensor"):
        PreferenceLoss("cpo", alpha=0.0)(0.5, a)
    with pytest.raises(DPALogicError, match="floating point"):
        PreferenceLoss("cpo", alpha=0.0)(torch.tensor([-1, -2]), torch.tensor([-1, -2]))
    with pytest.raises(DPALogicError, match="unknown atom 'Foo'"):
        PreferenceLoss("cpo", alpha=0.0)(logps={"Foo": a, "M(yw)": a, "M(yl)": a})
    # a reference passed to a reference-free loss is fine (training loops pass it to every loss)
    torch.testing.assert_close(
        PreferenceLoss("cpo", alpha=0.0)(a, a.flip(0), a, a), PreferenceLoss("cpo", alpha=0.0)(a, a.flip(0))
    )


def test_a_formula_without_policy_atoms_warns():
    with pytest.warns(dpalogic.NoPolicyAtomWarning, match="cannot train"):
        loss_fn = PreferenceLoss("Ref(yw) -> Ref(yl)", reduction="none")
    a, b = -torch.rand(3, dtype=torch.float64), -torch.rand(3, dtype=torch.float64)
    # the warning is true: the loss does not depend on the policy's log-probs, and does on the reference's
    assert torch.equal(loss_fn(a, b, b, b.flip(0)), loss_fn(a * 7, b / 3, b, b.flip(0)))
    assert not torch.equal(loss_fn(a, b, b, b.flip(0)), loss_fn(a, b, b / 3, b.flip(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PreferenceLoss("dpo")  # policy atoms: no warning


def test_dir_lists_the_public_api_without_importing_torch():
    code = "import sys, dpalogic; print(','.join(dir(dpalogic))); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    names = set(out[0].split(","))
    assert set(dpalogic.__all__) <= names and "PreferenceLoss" in names and "FusedLinearPreferenceLoss" in names
    assert out[1] == "False"
    for name in dpalogic.__all__:
        assert getattr(dpalogic, name) is not None


def test_readme_lists_exactly_the_losses_that_need_lengths():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"# length-normalized losses \(([^)]*)\) need the token counts", readme).group(1)
    assert sorted(x.strip() for x in listed.split(",")) == sorted(n for n in NAMES if PreferenceLoss(n).needs_lengths)


def test_new_user_findings_are_clear_errors():
    """A NaN next to a probability in one tensor, a list for logps, backend='triton' for a structure with no Triton
    path, a non-bool validate, NaN hyperparameters and a float pair_margin: each a clear error naming the thing."""
    nan = float("nan")
    lp = -torch.rand(4, dtype=torch.float64)
    with pytest.raises(DPALogicError, match=r"chosen_logps \(log M\(yw\)\) has 0\.9"):
        PreferenceLoss("dpo", reduction="none")(torch.tensor([nan, 0.5, 0.7, 0.9], dtype=torch.float64), lp, lp, lp)
    k64 = "(M(y1), ExactlyOne(M(y1..y64)))"
    with pytest.raises(DPALogicError, match="logps must be a \\[B, K\\] tensor .* got list"):
        PreferenceLoss(k64)(logps=[[-1.0] * 64])
    with pytest.raises(DPALogicError, match="no Triton kernel"):
        PreferenceLoss(k64, backend="triton")
    with pytest.raises(DPALogicError, match="validate must be True or False"):
        PreferenceLoss("dpo", validate=None)
    with pytest.raises(DPALogicError, match=r"the scale β \(beta\) = nan is not a finite number"):
        PreferenceLoss("dpo", beta=nan)
    with pytest.raises(DPALogicError, match="the link parameter margin = nan"):
        PreferenceLoss("dpo", link="softplus(margin - z)", margin=nan)
    mod = module_for(lookup("dpo").program)
    with pytest.raises(DPALogicError, match="pair_margin must be a tensor, got float"):
        mod.per_pair_loss(lp, lp, lp, lp, pair_margin=1.0)
    assert "validate=False" in repr(PreferenceLoss("dpo", validate=False))
    # losses without a structure take the flags too (they always check their inputs; nothing to compile)
    assert type(PreferenceLoss("kto", validate=False, compile=True)).__name__ == "KTO"
