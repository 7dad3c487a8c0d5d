"""The hand-written stable primitives, once per backend (torch twin, Triton): the only helper source."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------- helpers (text)

# Each helper exists twice: torch (no suffix) and Triton (``_tl``). Triton's core language has no log1p/expm1 that
# also runs in the interpreter, so the Triton helpers build them from series near 0 and exp/log elsewhere.

_TORCH_HELPERS: dict[str, str] = {
    "softplus": '''
def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without overflow (torch's fused kernel; linear beyond 20, relative error below e^-20)."""
    return torch.nn.functional.softplus(x)
''',
    "scaled": '''
def _scaled(c: float, v: torch.Tensor) -> torch.Tensor:
    """c * v, and exactly 0 when c == 0 (a switched-off term contributes nothing, not 0 * inf)."""
    return c * v if c != 0.0 else torch.zeros_like(v)
''',
    "log1mexp": '''
def _log1mexp(x: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - e^x) and its derivative -e^x / (1 - e^x), accurate on both sides of -log 2.

    x is clamped just below 0 (p = 1 gives a large finite value); the derivative is 0 where the clamp is active.
    Every step is one elementwise pass (no torch.where, which evaluates both branches and is slow on the CPU).
    """
    xc = torch.clamp(x, max=-tiny)
    # w = e^x / (1 - e^x) to full relative accuracy for every x (expm1: no cancellation near 0); then
    # log(1 - e^x) = -log(1 + w) is one log1p, accurate on both sides of -log 2, and the derivative is -w.
    # In-place steps on the fresh temporaries: each new [B] buffer costs more than the arithmetic on it.
    w = torch.exp(xc).div_(torch.expm1(xc).neg_())
    value = torch.log1p(w).neg_()
    # the derivative −w where x <= -tiny, 0 where the clamp holds x (x >= 0; a fraction at subnormal x): w times
    # x/tiny clamped to [-1, 0], in float passes (a comparison and a bool mask cost 5-10 times more on the CPU)
    grad = w.mul_((x * (1.0 / tiny)).clamp_(-1.0, 0.0))
    return value, grad
''',
    "logaddexp": '''
def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log(e^a + e^b) and its partial derivatives sigma(a - b), sigma(b - a)."""
    return torch.logaddexp(a, b), torch.sigmoid(a - b), torch.sigmoid(b - a)
''',
}

_TRITON_HELPERS: dict[str, str] = {
    "log1p": '''
    @triton.jit
    def _log1p_tl(u):
        """log(1 + u): 2 atanh(u / (2 + u)) as a series for |u| < 0.1 (no cancellation), the plain log elsewhere."""
        s = u / (2.0 + u)
        s2 = s * s
        series = 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (0.2 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11))))))
        return tl.where(tl.abs(u) < 0.1, series, tl.log(1.0 + u))
''',
    "sigmoid": '''
    @triton.jit
    def _sigmoid_tl(x):
        """sigma(x) from e^(-|x|) <= 1: no overflow for any x."""
        e = tl.exp(-tl.abs(x))
        return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
''',
    "softplus": '''
    @triton.jit
    def _softplus_tl(x):
        """log(1 + e^x) without overflow."""
        return tl.maximum(x, 0.0) + _log1p_tl(tl.exp(-tl.abs(x)))
''',
    "scaled": '''
    @triton.jit
    def _scaled_tl(c, v):
        """c * v, and exactly 0 when c == 0 (a switched-off term contributes nothing, not 0 * inf)."""
        return tl.where(c != 0.0, c * v, 0.0)
''',
    "log1mexp": '''
    @triton.jit
    def _log1mexp_tl(x, TINY: tl.constexpr):
        """log(1 - e^x) and its derivative -e^x / (1 - e^x); x is clamped just below 0, as in the torch twin."""
        xc = tl.minimum(x, -TINY)
        u = tl.exp(xc)
        # 1 - e^x: -expm1(x) by its Taylor series in Horner form for x > -0.1 (no cancellation), directly elsewhere
        h = 1.0 + xc / 12
        h = 1.0 + xc / 11 * h
        h = 1.0 + xc / 10 * h
        h = 1.0 + xc / 9 * h
        h = 1.0 + xc / 8 * h
        h = 1.0 + xc / 7 * h
        h = 1.0 + xc / 6 * h
        h = 1.0 + xc / 5 * h
        h = 1.0 + xc / 4 * h
        h = 1.0 + xc / 3 * h
        h = 1.0 + xc / 2 * h
        q = tl.where(xc > -0.1, -xc * h, 1.0 - u)
        value = tl.where(xc > -0.6931471805599453, tl.log(q), _log1p_tl(-u))  # -log 2
        grad = tl.where(x <= -TINY, -u / q, 0.0)
        return value, grad
''',
    "logaddexp": '''
    @triton.jit
    def _logaddexp_tl(a, b):
        """log(e^a + e^b) and its partial derivatives sigma(a - b), sigma(b - a)."""
        d = a - b
        e = tl.exp(-tl.abs(d))
        big, small = 1.0 / (1.0 + e), e / (1.0 + e)
        return tl.maximum(a, b) + _log1p_tl(e), tl.where(d >= 0.0, big, small), tl.where(d >= 0.0, small, big)
''',
}

# what each helper calls (so only the helpers a program needs are emitted, in dependency order)
_TRITON_DEPS = {"softplus": ("log1p",), "log1mexp": ("log1p",), "logaddexp": ("log1p",)}
_TORCH_DEPS: dict[str, tuple[str, ...]] = {}
_ORDER = (
    "log1p",
    "sigmoid",
    "softplus",
    "scaled",
    "log1mexp",
    "logaddexp",
)


def _closure(names: set[str], deps: dict[str, tuple[str, ...]]) -> list[str]:
    out = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(deps.get(n, ()))
    return [n for n in _ORDER if n in out]
