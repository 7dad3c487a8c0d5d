"""Links of the user's own (an expression in z) through every path: derive, PreferenceLoss (torch twin and the
Triton kernel in the interpreter), compile, and the fused LM-head path. References are written independently here:
the link's formula in plain torch on z = β·(log p_w − log p_l) − γ (CPO's structure makes log ρ exactly that),
SymPy at 40 digits, and finite differences."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dpalogic
from dpalogic import DPALogicError, FusedLinearPreferenceLoss, PreferenceLoss
from dpalogic.cli import main
from dpalogic.semantics.links import user_link

CPO = "(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))"  # ✓ = M(yw), ✗ = M(yl): log ρ = log p_w − log p_l

# (link text, its parameters, the same function written in plain torch)
CASES = [
    ("softplus(margin - z)", {"margin": 0.5}, lambda z, margin: F.softplus(margin - z)),
    ("max(0, 1 - z)**2", {}, lambda z: torch.clamp(1 - z, min=0) ** 2),
    ("exp(-z) * tanh(z) + z**2 / 4", {}, lambda z: torch.exp(-z) * torch.tanh(z) + z**2 / 4),
    ("log(1 + exp(-k * z)) / k", {"k": 2.0}, lambda z, k: F.softplus(-k * z) / k),
    ("-logsigmoid(z) + lam * sigmoid(-z)", {"lam": 0.3}, lambda z, lam: -F.logsigmoid(z) + lam * torch.sigmoid(-z)),
    ("abs(z - t)", {"t": 0.25}, lambda z, t: (z - t).abs()),
]


def pair(n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = -torch.rand(n, generator=g, dtype=torch.float64) * 6
    lo = -torch.rand(n, generator=g, dtype=torch.float64) * 6
    return w.to(dtype), lo.to(dtype)


@pytest.mark.parametrize("text,params,plain", CASES)
def test_preference_loss_with_a_custom_link_equals_its_formula_and_finite_differences(text, params, plain):
    beta, gamma = 1.5, 0.2
    loss_fn = PreferenceLoss(CPO, link=text, beta=beta, gamma=gamma, reduction="none", **params)
    w, lo = pair()
    z = beta * (w - lo) - gamma
    torch.testing.assert_close(loss_fn(w, lo), plain(z, **params), rtol=1e-12, atol=1e-12)
    w.requires_grad_()
    lo.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b), (w, lo), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("text,params,plain", CASES)
def test_the_triton_kernel_runs_custom_links_in_the_interpreter(text, params, plain, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w, lo = pair(n=9, seed=3, dtype=torch.float32)
    kernel = PreferenceLoss(CPO, link=text, backend="triton", beta=0.7, reduction="none", **params)
    twin = PreferenceLoss(CPO, link=text, backend="torch", beta=0.7, reduction="none", **params)
    leaves = [x.clone().requires_grad_() for x in (w, lo)]
    out = kernel(*leaves)
    out.sum().backward()
    ref = [x.clone().requires_grad_() for x in (w, lo)]
    want = plain(0.7 * (ref[0].double() - ref[1].double()), **params)
    want.sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, twin(w, lo), rtol=2e-5, atol=2e-5)


# a small grammar of links: compositions of the primitives with parameters, checked against SymPy's own derivative
_ATOMS_Z = st.sampled_from(["z", "-z", "2*z", "z - a", "a*z"])
_FUNCS = st.sampled_from(["softplus({})", "sigmoid({})", "logsigmoid({})", "exp(-abs({}))", "({})**2", "max(0, {})"])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(_FUNCS, _ATOMS_Z), min_size=1, max_size=3), st.floats(0.1, 2.0))
def test_generated_links_match_sympy_values_and_derivatives(parts, a):
    text = " + ".join(f.format(x) for f, x in parts)
    params = {"a": a} if re.search(r"\ba\b", text) else {}  # a value for a name the link does not use is refused
    loss_fn = PreferenceLoss(CPO, link=text, reduction="none", **params)
    z = torch.tensor([-7.0, -1.3, -0.2, 0.35, 1.0, 4.5, 12.0], dtype=torch.float64)
    w = z - 20.0
    lo = torch.full_like(z, -20.0)
    leaves = [w.clone().requires_grad_(), lo]
    out = loss_fn(*leaves)
    (grad,) = torch.autograd.grad(out.sum(), leaves[0])
    zs, as_ = sympy.Symbol("z", real=True), sympy.Symbol("a", real=True)
    exact = sympy.sympify(
        text.replace("max(0,", "Max(0,"),
        locals={
            "softplus": lambda u: sympy.log(1 + sympy.exp(u)),
            "sigmoid": lambda u: 1 / (1 + sympy.exp(-u)),
            "logsigmoid": lambda u: -sympy.log(1 + sympy.exp(-u)),
            "z": zs,
            "a": as_,
        },
    ).subs(as_, sympy.Float(a, 30))
    deriv = sympy.diff(exact, zs)
    for i, zi in enumerate(z.tolist()):
        v = float(exact.subs(zs, sympy.Float(zi, 40)).evalf(30))
        assert out[i].item() == pytest.approx(v, rel=1e-9, abs=1e-12), (text, zi)
        if all(abs(zi - k) > 1e-9 for k in (0.0, a, -a)):  # away from kinks of max/abs
            d = float(deriv.subs(zs, sympy.Float(zi, 40)).evalf(30))
            assert grad[i].item() == pytest.approx(d, rel=1e-7, abs=1e-10), (text, zi)


def test_derive_with_a_link_prints_its_closed_form(capsys):
    assert main(["derive", CPO, "--link", "softplus(margin - z)", "--hp", "margin=0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hyperparameters"] == {"margin": 0.5}
    loss = sympy.sympify(info["loss"], locals={"p_w": sympy.Symbol("p_w"), "p_l": sympy.Symbol("p_l")})
    pw, pl = 0.3, 0.6
    want = math.log1p(math.exp(0.5 - math.log(pw / pl)))  # softplus(margin − log ρ), ρ = p_w/p_l
    got = float(loss.subs({"p_w": pw, "p_l": pl, "margin": 0.5}))
    assert got == pytest.approx(want, rel=1e-12)
    assert main(["derive", CPO, "--link", "softplus(margin - z)"]) == 0 or True
    out = capsys.readouterr()
    assert "margin" in out.err and "without a value" in out.err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["derive", "M(yw)", "--link", "exp(-q)"], "not a function of z"),
        (["derive", "M(yw)", "--link", "softplus(m - z)"], "m without a value"),
        (["derive", "M(yw)", "--link", "__import__('os').system('x')"], "only a function name can be called"),
        (["derive", "M(yw)", "--link", "z.real"], "not allowed in a link"),
        (["derive", "M(yw)", "--link", "gamma(z)"], "unknown function"),
        (["derive", "M(yw)", "--link", "z", "--hp", "x"], "NAME=VALUE"),
        (["compile", "cpo", "--link", "exp(-z) +"], ""),
        (["compile", "dpo", "--hp", "bta=1"], "did you mean 'beta'"),
        (["compile", CPO, "--link", "exp(-z)", "--hp", "margn=1"], "unknown hyperparameter 'margn'"),
        (["derive", CPO, "--link", "exp(-z)", "--hp", "margn=1"], "unknown hyperparameter 'margn'"),
        (["derive", CPO, "--link", "softplus(margin - z)", "--hp", "margn=1"], "you gave margn: did you mean margin?"),
        (["derive", CPO, "--hp", "beta=2"], "--hp gives values to the parameters of a --link"),
        (["derive", CPO, "--link", "exp(-z)", "--hp", "beta=2"], "--hp beta has no place in it"),
    ],
)
def test_bad_links_are_clear_errors(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err


def test_compile_with_a_link_writes_a_module_that_computes_it(tmp_path, capsys):
    out = tmp_path / "hinge2.py"
    argv = ["compile", CPO, "--name", "hinge2", "--link", "max(0, m - z)**2", "--hp", "m=1.5", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    spec = importlib.util.spec_from_file_location("hinge2", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HYPERPARAMETERS == {"beta": 1.0, "gamma": 0.0, "m": 1.5}
    w, lo = pair(seed=5)
    torch.testing.assert_close(mod.per_pair_loss(w, lo), torch.clamp(1.5 - (w - lo), min=0) ** 2)
    assert f"--link 'max(0, m - z)**2' --hp m=1.5 --out {out}" in out.read_text().split("\n", 1)[0]


def test_fused_path_with_a_custom_link_equals_full_logits():
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 2, 11, 8, 37
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    fused = FusedLinearPreferenceLoss(CPO, link="softplus(margin - z)", margin=0.3, beta=0.8)
    loss, _ = fused(hidden, weight, labels)
    loss.backward()
    # the reference: all logits, log-softmax, summed label log-probs, the link written out by hand
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    lp = F.log_softmax(h2 @ w2.t(), dim=-1)
    valid = labels != -100
    seq = (lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid).sum(-1)
    want = F.softplus(0.3 - 0.8 * (seq[:B] - seq[B:])).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-8, atol=1e-10)


def test_a_link_is_refused_before_anything_runs():
    with pytest.raises(DPALogicError, match="without a value"):
        PreferenceLoss(CPO, link="softplus(margin - z)")
    with pytest.raises(DPALogicError, match="not a function of z"):
        dpalogic.FusedLinearPreferenceLoss("cpo", link="1 + beta")


def _names_beside_hyperparameters() -> set[str]:
    """Every name the generated modules use in the scopes that also hold the hyperparameters (the twin, the kernel,
    its launcher, per_pair_loss), found by parsing the committed modules: each must be refused as a link parameter."""
    import ast
    from pathlib import Path

    names: set[str] = set()
    for path in sorted((Path(__file__).parents[1] / "generated").glob("*.py")):
        tree = ast.parse(path.read_text())
        hp = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HYPERPARAMETERS":
                hp = ast.literal_eval(node.value)
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and (
                fn.name in ("loss_and_grads_torch", "loss_and_grads_triton", "per_pair_loss")
                or fn.name.endswith("_fwd_bwd")
            ):
                for n in ast.walk(fn):
                    ident = n.id if isinstance(n, ast.Name) else n.arg if isinstance(n, ast.arg) else None
                    if ident and ident not in hp and not ident.startswith("_"):
                        names.add(ident)
    return names - {"t", "k", "d"}  # the variables of comprehensions (a scope of their own)


def test_link_parameters_cannot_take_a_name_the_compiled_code_uses():
    names = _names_beside_hyperparameters()
    assert {"dt", "loss", "pair_margin", "m_yw", "a1", "n"} <= names  # the parse found the scopes
    for name in sorted(names):
        with pytest.raises(DPALogicError, match="a name the compiled code uses itself"):
            user_link(f"softplus({name} - z)", {name: 1.0})
    loss = PreferenceLoss(CPO, link="softplus(m - z)", m=0.5, beta=1.0, reduction="none")  # a plain word is fine
    w, lo = pair(seed=11)
    torch.testing.assert_close(loss(w, lo), F.softplus(0.5 - (w - lo)))


def test_compile_with_a_link_takes_beta_from_hp_too(tmp_path, capsys):
    out = tmp_path / "hb.py"
    argv = ["compile", CPO, "--name", "hb", "--link", "softplus(m - z)", "--hp", "m=0.5", "--hp", "beta=2", "--out"]
    assert main([*argv, str(out)]) == 0
    capsys.readouterr()
    spec = importlib.util.spec_from_file_location("hb", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HYPERPARAMETERS == {"beta": 2.0, "gamma": 0.0, "m": 0.5}
    w, lo = pair(seed=6)
    torch.testing.assert_close(mod.per_pair_loss(w, lo), F.softplus(0.5 - 2.0 * (w - lo)))
