"""Links as SymPy expressions in ``z`` (docs/semantics.md §3): one registry, derivatives from SymPy.

A term of a program is ``c · f(z)`` with ``z = β·log ρ − γ``. Each link ``f`` here is an expression in the symbol
``z`` and named parameters (with defaults), written with the numerically stable primitives :class:`softplus`,
:class:`sigmoid` and :class:`logsigmoid`. Their derivatives are written in the same primitives, so
``sympy.diff(f, z)`` is already a stable formula, and the torch and Triton emitters (``dpalogic.compile.codegen``) print
both from the expression: no per-link code anywhere.

User links are parsed from text without evaluating it (``dpalogic.language.equation``); the common unstable spellings
(``log(1 + exp(u))``, ``1/(1 + exp(u))``, ``exp(u)/(1 + exp(u))``) are rewritten into the primitives first.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

import sympy

from dpalogic.errors import DPALogicError, unknown

Z = sympy.Symbol("z", real=True)


class _Primitive(sympy.Function):
    """A stable primitive: its derivative in primitives (``fdiff``), its ``exp``/``log`` form, its LaTeX."""

    latex = ""  # with {u} for the argument

    @classmethod
    def written_out(cls, u: sympy.Expr) -> sympy.Expr:  # pragma: no cover - every primitive defines it
        raise NotImplementedError

    def as_exp(self) -> sympy.Expr:
        return self.written_out(self.args[0])

    def _eval_rewrite_as_exp(self, u: sympy.Expr, **kwargs) -> sympy.Expr:  # SymPy's rewrite(exp) hook
        return self.as_exp()

    def _latex(self, printer) -> str:  # SymPy's LaTeX printer hook
        return self.latex.format(u=printer.doprint(self.args[0]))


class softplus(_Primitive):  # noqa: N801 - named as in torch
    """``log(1 + e^u)``; derivative ``σ(u)``."""

    latex = r"\log\left(1 + e^{{{u}}}\right)"

    @classmethod
    def written_out(cls, u: sympy.Expr) -> sympy.Expr:
        return sympy.log(1 + sympy.exp(u))

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sigmoid(self.args[0])


class sigmoid(_Primitive):  # noqa: N801
    """``1/(1 + e^(−u))``; derivative ``σ(u)·σ(−u)`` (no cancellation where σ ≈ 1)."""

    latex = r"\sigma\left({u}\right)"

    @classmethod
    def written_out(cls, u: sympy.Expr) -> sympy.Expr:
        return 1 / (1 + sympy.exp(-u))

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sigmoid(self.args[0]) * sigmoid(-self.args[0])


class logsigmoid(_Primitive):  # noqa: N801
    """``log σ(u) = −softplus(−u)``; derivative ``σ(−u)``."""

    latex = r"\log\sigma\left({u}\right)"

    @classmethod
    def written_out(cls, u: sympy.Expr) -> sympy.Expr:
        return -sympy.log(1 + sympy.exp(-u))

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sigmoid(-self.args[0])


PRIMITIVES = {"softplus": softplus, "sigmoid": sigmoid, "logsigmoid": logsigmoid}


def stable(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite overflow-prone spellings into the stable primitives (``log(1 + e^u)`` → ``softplus(u)``, …)."""
    u = sympy.Wild("u")
    rules = [
        (sympy.log(1 + sympy.exp(u)), lambda u: softplus(u)),
        (1 / (1 + sympy.exp(u)), lambda u: sigmoid(-u)),
        (sympy.exp(u) / (1 + sympy.exp(u)), lambda u: sigmoid(u)),
        (sympy.log(sigmoid(u)), lambda u: logsigmoid(u)),
        (sympy.log(1 / (1 + sympy.exp(u))), lambda u: -softplus(u)),
    ]
    for pattern, build in rules:
        expr = expr.replace(pattern, build)
    return expr


DISPLAY = {"epsilon": "ε", "tau": "τ"}  # parameters written by name when a term gives no value (others: the default)
FORMULA_NAMES = {"margin": "m", **DISPLAY}  # names in the general formula f(z)


def to_exp(expr: sympy.Expr) -> sympy.Expr:
    """The primitives written out with ``exp`` and ``log`` (closed forms for display and algebra)."""
    return expr.replace(lambda e: isinstance(e, _Primitive), lambda e: e.as_exp())


@dataclass(frozen=True)
class Link:
    """A link ``f(z)``: its expression, parameters with defaults, how it reads, and what it is for.

    ``template`` is the readable form with ``{z}`` (the argument as written), ``{zz}`` (parenthesized when it is
    not a single name) and ``{<param>}`` placeholders; without one, the expression itself is printed.
    """

    name: str
    expr: sympy.Expr
    params: tuple[tuple[str, float], ...] = ()
    monotone: bool = True  # non-increasing in z everywhere, so it keeps the structures' order (§5)
    doc: str = ""
    template: str = ""

    @property
    def formula(self) -> str:
        """``f(z)`` as text: ``−log σ(z)``, ``max(0, margin − z)``."""
        names = FORMULA_NAMES if self.template else {}
        return self.render("z", {k: names.get(k, k) for k, _ in self.params})

    def render(self, z: str, params: dict[str, str]) -> str:
        """``f`` as text with ``z`` (an expression string) and the parameters substituted."""
        zz = z if z.replace("_", "").isalnum() else f"({z})"
        values = {k: params.get(k, DISPLAY.get(k, f"{default:g}")) for k, default in self.params}
        if not self.template:
            import re

            text = re.sub(r"\bz\b", "ζ", sympy.sstr(self.expr)).replace("**", "^").replace("*", "·")
            for k, v in values.items():
                text = re.sub(rf"\b{re.escape(k)}\b", v, text)
            return text.replace("ζ", zz)
        template = self.template
        if self.name == "hinge" and values.get("margin") in ("0", "0.0"):
            template = "max(0, −{zz})"
        return template.format(z=z, zz=zz, **values)

    def sympy(self, z: sympy.Expr, **values: sympy.Expr) -> sympy.Expr:
        """The closed form ``f(z)`` in ``exp``/``log`` (what derive and show print)."""
        return to_exp(self.at(z, **values))

    @property
    def param_symbols(self) -> dict[str, sympy.Symbol]:
        return {k: sympy.Symbol(k, real=True) for k, _ in self.params}

    @property
    def derivative(self) -> sympy.Expr:
        """``f'(z)``, in the stable primitives."""
        return stable(sympy.diff(self.expr, Z))

    def at(self, z: sympy.Expr, **values: sympy.Expr) -> sympy.Expr:
        """``f`` with ``z`` and the parameters substituted (closed forms, decompilation)."""
        subs = {Z: z}
        for k, default in self.params:
            subs[sympy.Symbol(k, real=True)] = sympy.sympify(values.get(k, default))
        return self.expr.xreplace(subs)


def _p(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, real=True)


_z = Z
LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link("logistic", softplus(-_z), (), True, "the semantic loss itself, −log σ(z); DPO, CPO, ORPO, SimPO",
             "−log σ({z})"),
        Link("hinge", sympy.Max(0, _p("margin") - _z), (("margin", 1.0),), True,
             "SLiC, RRHF, TRL's hinge; flat once z ≥ margin", "max(0, {margin} − {zz})"),
        Link("squared", _z**2, (), False, "IPO, SPPO: pulls z to 0, so margins beyond the target are punished",
             "{zz}²"),
        Link("sigmoid", sigmoid(-_z), (), True, "APO: bounded, saturating", "σ(−{zz})"),
        Link("exponential", sympy.exp(-_z), (), True, "boosting-style exponential loss", "exp(−{zz})"),
        Link(
            "exo",
            sigmoid(_z) * (logsigmoid(_z) - sympy.log(1 - _p("epsilon")))
            + sigmoid(-_z) * (logsigmoid(-_z) - sympy.log(_p("epsilon"))),
            (("epsilon", 1e-3),), False,
            "EXO: KL(Bernoulli(σ(z)) ‖ Bernoulli(1−ε)), minimal at z = log((1−ε)/ε)",
            "σ({z})·(log σ({z}) − log(1 − {epsilon})) + σ(−{zz})·(log σ(−{zz}) − log {epsilon})",
        ),
        Link(
            "discopop",
            sigmoid(-_z / _p("tau")) * softplus(-_z) + sympy.exp(logsigmoid(_z / _p("tau")) - _z),
            (("tau", 0.05),), False,
            "DiscoPOP: logistic for z < 0, exponential for z > 0, blended by σ(z/τ) (formed in log space)",
            "(1 − σ({zz}/{tau}))·(−log σ({z})) + σ({zz}/{tau})·exp(−{zz})",
        ),
    )
}  # fmt: skip


def _link_functions() -> dict[str, tuple[int, int, object]]:
    """The equation vocabulary, with sigmoid, softplus and logsigmoid as the stable primitives."""
    from dpalogic.language.equation import FUNCTIONS

    return {
        **FUNCTIONS,
        "sigmoid": (1, 1, sigmoid),
        "softplus": (1, 1, softplus),
        "logsigmoid": (1, 1, logsigmoid),
        "log1p": (1, 1, lambda x: sympy.log(1 + x)),  # log1p(exp(u)) becomes softplus(u) in stable()
    }


# names the generated modules use next to the hyperparameters (dpalogic.compile.module): a link parameter is a keyword
# argument and a variable there, so it must not be one of them (a parameter "dt" or "pair_margin" would break them)
_CODE_NAMES = frozenset(
    "z dt loss zero n grads grid mask offs shape device tensors refused backend reduction pair_margin grad_scale TINY "
    "BLOCK LN2 HAS_MARGIN KERNEL INTERPRETED torch tl triton math os float int max min abs len any all tuple range "
    "zip sum str bool dict LossFunction NAME ATOMS INPUTS LENGTHS HYPERPARAMETERS GRAD_SLOT GRAD_SIGN NAMED_INPUTS "
    "validate check_log_probs input_grads Sequence compile link spec self isinstance type".split()
)
# the twin's temporaries: top1, bot1, z1, f1, df1, ndf1, a1, u1_0, s1, k1, g1, c1, p1 (and anything with an underscore)
_TEMPORARY = re.compile(r"(top|bot|z|f|df|ndf|a|u|s|k|g|c|p)[0-9]+|.*_.*")


def _free_parameter_name(name: str) -> bool:
    return (
        name.isidentifier()
        and not keyword.iskeyword(name)
        and name not in _CODE_NAMES
        and not _TEMPORARY.fullmatch(name)
    )


def user_link(text: str, values: dict[str, float] | None = None) -> Link:
    """A link from the user's expression in ``z`` (parsed, never evaluated); its other names are parameters whose
    values come with the hyperparameters (``softplus(margin - z)`` with ``margin=0.5``). Registered under
    ``link:<text>`` so programs refer to it by name like any other link."""
    from dpalogic.language.equation import parse_expression

    if not isinstance(text, str) or not text.strip():
        raise DPALogicError("a link is an expression in z, such as 'softplus(-z)' or 'max(0, 1 - z)**2'")
    expr = parse_expression(
        text, variables={"z": Z}, functions=_link_functions(), assumptions={"real": True}, what="link"
    )
    expr = stable(expr)
    if Z not in expr.free_symbols:
        raise DPALogicError(f"the link {text!r} is not a function of z (z = β·log ρ − γ): write it in z")
    names = sorted(s.name for s in expr.free_symbols if s != Z)
    for n in names:
        if not _free_parameter_name(n):
            raise DPALogicError(
                f"the link {text!r} names a parameter {n!r}, a name the compiled code uses itself: call it something "
                "else (a plain word such as margin, tau or delta)"
            )
    given = values or {}
    missing = [n for n in names if n not in given]
    if missing:
        import difflib

        near = [f"{g}: did you mean {m}?" for m in missing for g in difflib.get_close_matches(m, list(given), 1, 0.6)]
        raise DPALogicError(
            f"the link {text!r} uses {', '.join(missing)} without a value"
            + (f" (you gave {'; '.join(near)})" if near else "")
            + ": give "
            + ", ".join(f"{n}=…" for n in missing)
            + " with the other hyperparameters (on the command line: "
            + " ".join(f"--hp {n}=…" for n in missing)
            + ")"
        )
    params = []
    for n in names:
        try:
            params.append((n, float(given[n])))
        except (TypeError, ValueError):
            raise DPALogicError(f"the link parameter {n} must be a number, got {given[n]!r}") from None
    from dpalogic.compile.codegen import check_link

    link = Link(f"link:{text.strip()}", expr, tuple(params), False, "user-defined: " + text.strip())
    check_link(link)  # every function in it can be emitted for torch and Triton, with its derivative
    LINKS.setdefault(link.name, link)
    return LINKS[link.name]


def get(name: str) -> Link:
    if name not in LINKS:
        raise unknown("link", name, LINKS)
    return LINKS[name]
