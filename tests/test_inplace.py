"""The torch twin's in-place pass (dpalogic.compile.inplace): random straight-line programs give bit-identical outputs
with and without it, and never touch their inputs; the catalog's twins run on inputs that stay as they were."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic.compile.codegen import module_for
from dpalogic.compile.inplace import in_place
from dpalogic.semantics.catalog import entries

INPUTS = ["x0", "x1", "x2"]
OPS = ["+", "-", "*", "/"]


def _pair(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A helper as the twin's are: new buffers out."""
    return v * 2.0, v + 1.0


@st.composite
def programs(draw) -> tuple[list[str], set[str]]:
    """Straight-line statements in the emitter's style: arithmetic on tensors and scalars (nested), negation,
    torch calls, helper calls unpacked into two names, aliases, and a conditional rebinding."""
    names = list(INPUTS)
    lines: list[str] = []

    scalars = ["beta", "0.5", "2.0"]

    def operand() -> str:
        if draw(st.integers(0, 4)) == 0:
            return draw(st.sampled_from(scalars))
        return draw(st.sampled_from(names))

    def expr(depth: int) -> str:
        kind = draw(st.integers(0, 5 if depth else 3))
        if kind == 0:
            return f"-{draw(st.sampled_from(names))}"
        if kind == 1:
            return f"torch.sigmoid({draw(st.sampled_from(names))})"
        if kind >= 4:
            return f"({expr(depth - 1)}) {draw(st.sampled_from(OPS))} {operand()}"
        return f"{operand()} {draw(st.sampled_from(OPS))} {draw(st.sampled_from(names))}"

    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(f"t{i} = {draw(st.sampled_from(names))}")  # an alias
            names.append(f"t{i}")
        elif kind == 1:
            lines.append(f"t{i}, w{i} = _pair({draw(st.sampled_from(names))})")
            names += [f"t{i}", f"w{i}"]
        elif kind == 3:  # a scalar temporary from a call (a link's exp(tau)): a Python float, never overwritten
            lines.append(f"s{i} = math.exp({draw(st.sampled_from(scalars))})")
            scalars.append(f"s{i}")
        elif kind == 2 and len(names) > 3:
            v = draw(st.sampled_from(names[3:]))
            lines += ["if flag:", f"    {v} = {v} + x0"]  # the margin's form: a conditional rebinding
        else:
            lines.append(f"t{i} = {expr(2)}  # a comment")
            names.append(f"t{i}")
    lines.append(f"loss = {draw(st.sampled_from(names))} + 0.0")
    outputs = {"loss", *draw(st.lists(st.sampled_from(names), max_size=3))}
    return lines, outputs


def _run(lines: list[str], outputs: set[str], flag: bool, inputs: dict[str, torch.Tensor]) -> dict:
    scope = {"torch": torch, "math": math, "_pair": _pair, "beta": 0.3, "flag": flag, **inputs}
    exec("\n".join(lines), scope)  # noqa: S102 - the test's own generated statements
    return {k: scope[k] for k in outputs}


@settings(max_examples=300, deadline=None)
@given(programs(), st.booleans(), st.integers(0, 2**31 - 1))
def test_in_place_programs_equal_the_originals_bit_for_bit(program, flag, seed):
    lines, outputs = program
    rewritten = in_place(lines, INPUTS, outputs, 200)
    g = torch.Generator().manual_seed(seed)
    inputs = {k: torch.randn(6, generator=g, dtype=torch.float64) for k in INPUTS}
    kept = {k: v.clone() for k, v in inputs.items()}
    want = _run(lines, outputs, flag, {k: v.clone() for k, v in inputs.items()})
    got = _run(rewritten, outputs, flag, inputs)
    for k in outputs:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)
    for k in INPUTS:  # the caller's buffers are never written
        assert torch.equal(inputs[k], kept[k])


def test_in_place_rewrites_only_dead_temporaries():
    lines = ["a = x0 + x1", "b = a * 2.0", "c = a + b", "d = -c", "e = beta * (d - x0)"]
    assert in_place(lines, INPUTS, {"e"}, 120) == [
        "a = x0 + x1",  # inputs are the caller's
        "b = a * 2.0",  # a is read again below
        "c = a.add_(b)",
        "d = c.neg_()",
        "e = d.sub_(x0).mul_(beta)",  # multiplication commutes: the scalar takes the temporary's buffer
    ]
    aliased = ["a = x0 + x1", "b = a", "c = a + 1.0", "d = b * 2.0"]
    assert in_place(aliased, INPUTS, {"c", "d"}, 120) == ["a = x0 + x1", "b = a", "c = a + 1.0", "d = b.mul_(2.0)"]
    assert in_place(["a = x0 + x1", "b = a * a"], INPUTS, {"b"}, 120)[1] == "b = a * a"  # read twice in one line
    assert in_place(["a = x0 + x1", "b = a + x2 + x1 + x0"], INPUTS, {"b"}, 10)[1] == "b = a + x2 + x1 + x0"  # width


def test_in_place_keeps_scalars_and_conditionally_rebound_aliases():
    # math.exp(tau) is a Python float: arithmetic on it is never made in place
    lines = ["u = math.exp(beta)", "a = x0 + x1", "d = 2.0 * u * a"]
    assert in_place(lines, INPUTS, {"d"}, 120)[2] == "d = a.mul_(2.0 * u)"
    # t may still hold a's buffer when the branch is not taken: a's buffer is not overwritten after it
    lines = ["a = x0 + x1", "t = a", "if flag:", "    t = t + x0", "d = a * 2.0", "loss = d + t"]
    out = in_place(lines, INPUTS, {"loss"}, 120)
    assert out[4] == "d = a * 2.0"
    for flag in (False, True):
        inputs = {k: torch.full((1,), float(i + 1)) for i, k in enumerate(INPUTS)}
        want = _run(lines, {"loss"}, flag, {k: v.clone() for k, v in inputs.items()})["loss"]
        assert torch.equal(_run(out, {"loss"}, flag, inputs)["loss"], want)


def test_the_twin_broadcasts_when_called_directly():
    mod = module_for(entries()["dpo"].program)
    w, ref_l = -torch.rand(4, dtype=torch.float64), -torch.rand(4, dtype=torch.float64)
    lo, ref_w = torch.tensor([-1.5], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64)
    loss, grads = mod.loss_and_grads_torch(w, lo, ref_w, ref_l, beta=0.2)
    full = [w, lo.expand(4), ref_w.expand(4), ref_l]
    want, want_grads = mod.loss_and_grads_torch(*full, beta=0.2)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], want_grads[0], rtol=0, atol=0)


def test_catalog_twins_leave_their_inputs_untouched():
    g = torch.Generator().manual_seed(3)
    for entry in entries().values():
        program = entry.program
        mod = module_for(program)
        args = [-torch.rand(5, generator=g, dtype=torch.float64) * 8 for _ in mod.INPUTS]
        args += [torch.randint(1, 30, (5,), generator=g).double() for _ in mod.LENGTHS]
        kept = [a.clone() for a in args]
        loss, grads = mod.loss_and_grads_torch(*args, **mod.HYPERPARAMETERS)
        grads = mod.input_grads(grads)
        assert torch.isfinite(loss).all() and all(torch.isfinite(d).all() for d in grads)
        for a, k in zip(args, kept):
            assert torch.equal(a, k), program.name
