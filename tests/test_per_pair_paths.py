"""The per-pair fast path's shortcuts against independent references: gradients shared between inputs (and saved
once), terms switched off by their hyperparameters left out of the compiled program, links with a constant
derivative, the sign check on log-probs, and accelerate's process state reused by a second run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic import DPALogicError, PreferenceLoss
from dpalogic.compile.codegen import module_for
from dpalogic.semantics.catalog import lookup


def leaves(B: int, n: int, seed: int, dtype=torch.float64, low: float = -30.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(B, generator=g, dtype=torch.float64) * low).to(dtype).requires_grad_() for _ in range(n)]


def test_dpo_gradients_are_shared_and_match_the_closed_form():
    mod = module_for(lookup("dpo").program)
    # d chosen = d ref rejected = −d rejected = −d ref chosen: one distinct gradient, signed per input
    assert mod.GRAD_SLOT == (0, 0, 0, 0) and mod.GRAD_SIGN == (1.0, -1.0, -1.0, 1.0)
    x = leaves(7, 4, seed=1)
    loss, distinct = mod.loss_and_grads_torch(*[t.detach() for t in x], beta=0.3)
    assert len(distinct) == 1  # computed (and saved for backward) once
    grads = mod.input_grads(distinct)
    assert grads[0] is grads[3]
    # −log σ(β·(log π_w − log π_ref,w − log π_l + log π_ref,l)): d/d chosen = −β σ(−z)
    z = 0.3 * ((x[0] - x[2]) - (x[1] - x[3])).detach()
    torch.testing.assert_close(loss, torch.nn.functional.softplus(-z), rtol=1e-14, atol=0)
    torch.testing.assert_close(grads[0], -0.3 * torch.sigmoid(-z), rtol=1e-14, atol=0)
    torch.testing.assert_close(grads[1], 0.3 * torch.sigmoid(-z), rtol=1e-14, atol=0)


def test_shared_gradients_reach_inputs_of_different_dtypes():
    """d chosen and d ref rejected share one saved tensor; each input still gets its gradient in its own dtype."""
    x = leaves(9, 4, seed=2, low=-8.0)
    mixed = [x[0].detach().half().requires_grad_(), x[1].detach().float().requires_grad_()]
    mixed += [x[2].detach().clone().requires_grad_(), x[3].detach().bfloat16().requires_grad_()]
    PreferenceLoss("dpo", beta=0.5, reduction="sum")(*mixed).backward()
    ref = [t.detach().to(m.dtype).double().requires_grad_() for t, m in zip(x, mixed)]
    z = 0.5 * ((ref[0] - ref[2]) - (ref[1] - ref[3]))
    torch.nn.functional.softplus(-z).sum().backward()
    for m, r in zip(mixed, ref):
        assert m.grad.dtype == m.dtype
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(m.dtype, 1e-6)
        torch.testing.assert_close(m.grad.double(), r.grad, rtol=tol, atol=tol)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.integers(0, 10**6), st.sampled_from(["orpo", "cpo", "slic", "rrhf"]))
def test_switched_off_terms_are_left_out_exactly(B, seed, name):
    """alpha = 0 removes the NLL term from the compiled program: same values and gradients as the whole program."""
    program = lookup(name).program
    hp = {"alpha": 0.0}
    loss_fn = PreferenceLoss(name, reduction="none", **hp)
    assert len(loss_fn._running.terms) < len(program.terms)
    x = leaves(B, 2, seed, low=-20.0)
    g = torch.Generator().manual_seed(seed)
    lens = [torch.randint(0, 30, (B,), generator=g) for _ in range(2)]
    got = loss_fn(x[0], x[1], chosen_lengths=lens[0], rejected_lengths=lens[1])
    got_grads = torch.autograd.grad(got.sum(), x)
    whole = module_for(program)
    by_name = {"chosen_lengths": lens[0], "rejected_lengths": lens[1]}
    args = [*x, *[by_name[n] for n in whole.LENGTHS]]
    want = whole.per_pair_loss(*args, **{**program.defaults, **hp})
    want_grads = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("link,f", [("-z", lambda z: -z), ("2 * (1 - z)", lambda z: 2 * (1 - z))])
def test_a_linear_link_has_tensor_gradients(link, f):
    """A link with a constant derivative (f' = −1): every input gets a tensor gradient (it used to fail to save)."""
    x = leaves(6, 4, seed=3, low=-5.0)
    PreferenceLoss("dpo", link=link, beta=0.25)(*x).backward()
    ref = [t.detach().clone().requires_grad_() for t in x]
    f(0.25 * ((ref[0] - ref[2]) - (ref[1] - ref[3]))).mean().backward()
    for a, b in zip(x, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=1e-15)


def test_positive_log_probs_are_refused_with_the_largest_value():
    x = [t.detach() for t in leaves(5, 4, seed=4)]
    x[2][3] = 0.75  # a probability passed by mistake
    with pytest.raises(DPALogicError, match=r"ref_chosen_logps|Ref\(yw\) has 0\.75"):
        PreferenceLoss("dpo")(*x)
    x[2][3] = 0.005  # rounding above 0 in a long log-softmax sum: accepted
    assert torch.isfinite(PreferenceLoss("dpo")(*x))


def test_a_second_run_reuses_accelerates_state_or_is_refused():
    """accelerate's settings are per process: the same ones are reused, others are refused with the way out."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from dpalogic.training import scaling

    Accelerator(cpu=True)  # what a CPU training run creates first
    scaling._check_process_state(cpu=True, mixed="no")  # the same settings: fine
    Accelerator(cpu=True)  # and accelerate agrees
    with pytest.raises(DPALogicError, match="new process"):
        scaling._check_process_state(cpu=True, mixed="fp16")
    with pytest.raises(DPALogicError, match="a GPU"):
        scaling._check_process_state(cpu=False, mixed="no")
