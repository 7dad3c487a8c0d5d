"""Kernel benchmarks: one run, tables of ratios against anchors measured in the same run, on whatever device is here.

    python benchmarks/kernels.py            # CPU: small shapes, a few minutes; CUDA: the big shapes
    python benchmarks/kernels.py --quick    # fewer sizes (a smoke run)

(a) per-pair loss on log-probs, forward + backward, B = 1k … 64k: PreferenceLoss (what a user calls: input checks,
    then the generated module, its torch twin on CPU and the fused Triton kernel on CUDA) and the generated module's
    per_pair_loss alone vs Liger-Kernel's preference_loss_fn (the plain torch expression TRL/Liger use) vs
    torch.compile of that expression vs TRL's own ORPO loss method. Every candidate gets the same tensors (ORPO's
    token counts as the float tensors Liger's expression divides by).
(b) the fused LM-head path from hidden states (DPO, ORPO, SimPO, CPO): FusedLinearPreferenceLoss vs a full-logits
    reference (materialize [2B·T, V], log_softmax, autograd) vs Liger's LigerFusedLinear*Loss(compiled=False) vs
    TRL's chunked log-prob path (trl.kernels.ChunkedLogProbFunction, which DPOTrainer's fused LM head runs) plus the
    loss: time and peak memory, and the LM-head matmuls alone as the floor. On CUDA "ours" is
    backend="auto", i.e. the Triton kernels of dpalogic/runtime/fused_kernels.py on each chunk's logits, and one more column
    compares it with the same chunked path in torch ops (backend="torch").

Peak memory: on CUDA torch.cuda.max_memory_allocated over the call; on CPU the torch profiler's allocator events
(profile_memory=True): the running sum of allocations minus frees during the call, its maximum. Both count the
memory a call allocates beyond its inputs (gradients included), not the Python process's RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (CPU memory) is otherwise chatty on stderr

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpalogic import FusedLinearPreferenceLoss, PreferenceLoss  # noqa: E402
from dpalogic.compile.codegen import module_for  # noqa: E402
from dpalogic.semantics.catalog import lookup  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` over ``repeat`` runs, in seconds (the minimum: least disturbed by other load)."""
    return timeit_interleaved({"fn": fn}, repeat, warmup)["fn"]


def timeit_interleaved(fns: dict, repeat: int = 5, warmup: int = 1, calls: int = 1) -> dict:
    """Best wall time of each function per call, the functions taking turns (round robin) so that a burst of load from
    other jobs on a shared machine slows all of them alike instead of skewing one ratio. ``calls`` per turn: 1 times a
    call right after the others ran (cold caches: what a training step sees), more the steady cost in a loop."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[key] = min(best[key], (time.perf_counter() - t0) / calls)
    return best


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side prints start/stop lines there, whatever the log level)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(fn) -> int:
    """Peak memory allocated by ``fn()`` beyond what was allocated before it."""
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def machine() -> str:
    if DEV.type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# --------------------------------------------------------------------------------------------------- (a) per pair


PROTOCOLS = ((1, "one call a turn (cold caches)"), (20, "20 calls a turn (in a loop)"))


def bench_per_pair(sizes: list[int]) -> list[str]:
    """One table per protocol; each case is set up (and its torch.compile done) once for both."""
    cases = [_per_pair_case(name, B) for name in ("dpo", "orpo") for B in sizes]
    return [_per_pair_table([rows[i] for rows in cases]) for i in range(len(PROTOCOLS))]


def _per_pair_table(rows: list[list[str]]) -> str:
    gen = "Triton kernel" if DEV.type == "cuda" else "torch twin"
    header = [
        "loss",
        "B",
        f"PreferenceLoss ({gen}) ms (anchor)",
        "validate=False ×",
        "generated per_pair_loss ×",
        "Liger expr ×",
        "torch.compile(Liger expr) ×",
        "TRL expr ×",
    ]
    return table(header, rows)


def _per_pair_case(name: str, B: int) -> list[list[str]]:
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
    from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction

    hp = {"beta": 0.1} if name == "dpo" else {"beta": 0.1, "alpha": 0.0}  # ORPO without its NLL term, as Liger's
    mod = module_for(lookup(name).program)
    ours = PreferenceLoss(name, **hp)
    unchecked = PreferenceLoss(name, **hp, validate=False)  # no max over the inputs (Liger's expression has none)
    g = torch.Generator().manual_seed(B)
    leaves = [(-torch.rand(B, generator=g) * 40 - 1).to(DEV).requires_grad_() for _ in range(4)]
    nc, nr = (torch.randint(5, 200, (B,), generator=g).to(DEV).float() for _ in range(2))
    target = torch.empty(2 * B, device=DEV)  # Liger reads only its first dimension (the number of pairs)

    if name == "dpo":

        def generated():
            mod.per_pair_loss(*leaves, beta=0.1).mean().backward()

        def preference_loss(loss=ours):
            loss(*leaves).backward()

        def liger_expr(c, r, rc, rr):
            return LigerFusedLinearDPOFunction.preference_loss_fn(c, r, target, rc, rr, beta=0.1)[0]

    else:

        def generated():  # the whole catalog program: its NLL term is evaluated and multiplied by alpha = 0
            mod.per_pair_loss(leaves[0], leaves[1], nc, nr, **hp).mean().backward()

        def preference_loss(loss=ours):  # PreferenceLoss compiles only the terms alpha = 0 leaves on
            loss(leaves[0], leaves[1], chosen_lengths=nc, rejected_lengths=nr).backward()

        def liger_expr(c, r, rc, rr):  # Liger's ORPO takes average (per-token) log-probs
            return LigerFusedLinearORPOFunction.preference_loss_fn(c / nc, r / nr, target, beta=0.1)[0]

    def liger():
        liger_expr(*leaves).backward()

    trl = None
    if name == "orpo":  # TRL 1.16's DPO sigmoid loss is inline in DPOTrainer._compute_loss (Liger's expression)
        import warnings
        from types import SimpleNamespace

        with warnings.catch_warnings():  # TRLExperimentalWarning
            warnings.simplefilter("ignore")
            from trl.experimental.orpo.orpo_trainer import ORPOTrainer
        stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=DEV))  # what the method reads of self

        def trl():
            losses = ORPOTrainer.odds_ratio_loss(stub, leaves[0] / nc, leaves[1] / nr)[0]
            (-losses.mean()).backward()  # TRL returns β·log σ(log odds), the negated loss

    compiled = None
    try:
        compiled_fn = torch.compile(liger_expr)
        compiled_fn(*leaves).backward()  # compile now (and fail now, if it will)

        def compiled():
            compiled_fn(*leaves).backward()

    except Exception as e:  # noqa: BLE001 - torch.compile may be unavailable (no C++ compiler on the machine)
        print(f"  torch.compile skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
    repeat = 20 if B <= 4096 else 7
    fns = {"ours": preference_loss, "unchecked": lambda: preference_loss(unchecked), "gen": generated, "liger": liger}
    if compiled:
        fns["comp"] = compiled
    if trl:
        fns["trl"] = trl
    rows = []
    for calls, _ in PROTOCOLS:
        t = timeit_interleaved(fns, repeat, calls=calls)
        t_ours, t_gen, t_lig, t_comp = t["ours"], t["gen"], t["liger"], t.get("comp", float("nan"))
        print(
            f"  (a) {name} B={B} ({calls} call{'s' * (calls > 1)} a turn): PreferenceLoss / Liger expr "
            f"{t_ours / t_lig:.2f}, with validate=False {t['unchecked'] / t_lig:.2f}",
            flush=True,
        )
        rows.append([
            name,
            f"{B:,}",
            f"{t_ours * 1e3:.3f}",
            f"{t['unchecked'] / t_ours:.2f}",
            f"{t_gen / t_ours:.2f}",
            f"{t_lig / t_ours:.2f}",
            f"{t_comp / t_ours:.2f}" if compiled else "n/a",
            f"{t['trl'] / t_ours:.2f}" if trl else "n/a",
        ])  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------- (b) fused


def liger_module(name: str):
    from liger_kernel.chunked_loss import (
        LigerFusedLinearCPOLoss,
        LigerFusedLinearDPOLoss,
        LigerFusedLinearORPOLoss,
        LigerFusedLinearSimPOLoss,
    )

    return {
        "dpo": lambda: LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True, average_log_prob=False),
        "orpo": lambda: LigerFusedLinearORPOLoss(beta=0.1, compiled=False),
        "simpo": lambda: LigerFusedLinearSimPOLoss(beta=0.1, compute_nll_loss=False, compiled=False),
        "cpo": lambda: LigerFusedLinearCPOLoss(beta=0.1, alpha=1.0, compiled=False, average_log_prob=False),
    }[name]()


def seq_logps_full(h, w, b, labels):
    """Per-sequence summed log-probs from the full logits ``[2B, T, V]``: log_softmax, gather, autograd."""
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    valid = labels != -100
    safe = torch.where(valid, labels, 0)
    tok = F.log_softmax(logits.float(), -1).gather(-1, safe[..., None]).squeeze(-1)
    return (tok * valid).sum(-1), valid.sum(-1)


def seq_logps_trl_chunked(h, w, b, labels):
    """Per-sequence summed log-probs from TRL's chunked log-prob function (what DPOTrainer's fused LM head runs): an
    online logsumexp over vocabulary tiles, the logits recomputed in its backward."""
    from trl.kernels import ChunkedLogProbFunction

    N, T, H = h.shape
    valid = labels != -100
    targets = torch.where(valid, labels, 0).reshape(-1)
    tok = ChunkedLogProbFunction.apply(h.reshape(N * T, H), w, b, targets, 1.0, 32768, None, 1.0, ())[0]
    return (tok.view(N, T) * valid).sum(-1), valid.sum(-1)


def bench_fused(shapes: list[tuple[int, int, int, int]], repeat: int, dtype: torch.dtype) -> str:
    rows = []
    for B, T, H, V in shapes:
        g = torch.Generator().manual_seed(0)
        data = {
            "hidden": torch.randn(2 * B, T, H, generator=g).to(DEV, dtype),
            "weight": (torch.randn(V, H, generator=g) / H**0.5).to(DEV, dtype),
            "bias": (torch.randn(V, generator=g) * 0.01).to(DEV, dtype),
            "labels": torch.randint(0, V, (2 * B, T), generator=g).to(DEV),
        }
        data["labels"][:, : T // 4] = -100  # the prompt
        noise = 0.01 * torch.randn(2 * B, T, H, generator=g).to(DEV, dtype)
        data["ref_hidden"] = (data["hidden"] + noise).contiguous()
        rows += [_fused_case(name, data, repeat) for name in ("dpo", "orpo", "simpo", "cpo")]
        if B < 4:  # one pair is over a quarter of the batch: also the low-memory mode, a quarter of a pair per slice
            rows += [_fused_case(name, data, repeat, max_tokens=T // 2) for name in ("dpo", "orpo", "simpo", "cpo")]
    header = ["loss", "ours: chunk", "B×T×H×V", "ours ms", "ours peak MiB", "matmul floor ms", "time / floor"]
    header += ["time / Liger", "time / full", "time / TRL chunked", "mem / Liger", "mem / full", "mem / TRL chunked"]
    if DEV.type == "cuda":
        header += ["time / ours in torch ops"]
    return table(header, rows)


def _fused_case(name: str, d: dict, repeat: int, max_tokens: int | None = None) -> list[str]:
    hidden, weight, bias, labels, ref_hidden = d["hidden"], d["weight"], d["bias"], d["labels"], d["ref_hidden"]
    N, T, H = hidden.shape
    B, V = N // 2, weight.shape[0]
    uses_ref = name == "dpo"
    # backend="auto": the Triton kernels on CUDA
    fused = FusedLinearPreferenceLoss(name, chunk_size=1, max_chunk_tokens=max_tokens)
    fused_torch = FusedLinearPreferenceLoss(name, chunk_size=1, max_chunk_tokens=max_tokens, backend="torch")
    liger = liger_module(name)
    plain = PreferenceLoss(name)

    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]  # allocated outside the measurements

    def leaves():
        return params

    def done():  # drop the gradients inside the measured call, after their peak: each call starts from none
        for t in params:
            t.grad = None

    def run_ours(module=fused):
        h, w, b = leaves()
        kw = {"ref_hidden": ref_hidden, "ref_weight": weight} if uses_ref else {}
        module(h, w, labels, b, **kw)[0].backward()
        done()

    def run_liger():
        h, w, b = leaves()
        out = liger(w, h, labels, b, ref_hidden, weight, None) if uses_ref else liger(w, h, labels, b)
        out[0].backward()
        done()

    def run_full(trl_chunked: bool):
        h, w, b = leaves()
        lp, n = seq_logps_trl_chunked(h, w, b, labels) if trl_chunked else seq_logps_full(h, w, b, labels)
        ref_c = ref_r = None
        if uses_ref:
            with torch.no_grad():
                if trl_chunked:
                    ref, _ = seq_logps_trl_chunked(ref_hidden, weight, None, labels)
                else:
                    ref, _ = seq_logps_full(ref_hidden, weight, None, labels)
            ref_c, ref_r = ref[:B], ref[B:]
        plain(lp[:B], lp[B:], ref_c, ref_r, chosen_lengths=n[:B], rejected_lengths=n[B:]).backward()
        done()

    fbuf = torch.empty(2 * T, V, dtype=hidden.dtype, device=DEV)
    hbuf = torch.empty(2 * T, H, dtype=hidden.dtype, device=DEV)
    wbuf = torch.zeros(V, H, dtype=hidden.dtype, device=DEV)

    def run_floor():
        """The LM-head matmuls any exact forward + backward does, at one pair's rows: logits, ∂h, ∂W (and the
        reference model's logits): the floor the fused path is measured against."""
        for s in range(B):
            rows = torch.cat([hidden[s], hidden[B + s]])
            torch.mm(rows, weight.t(), out=fbuf)
            torch.mm(fbuf, weight, out=hbuf)
            wbuf.addmm_(fbuf.t(), rows)
            if uses_ref:
                torch.mm(torch.cat([ref_hidden[s], ref_hidden[B + s]]), weight.t(), out=fbuf)

    runs = {
        "ours": run_ours,
        "floor": run_floor,
        "full": lambda: run_full(False),
        "liger": run_liger,
        "trl": lambda: run_full(True),
    }
    if DEV.type == "cuda":  # on the CPU both would be the torch path
        runs["ours_torch"] = lambda: run_ours(fused_torch)
    times = timeit_interleaved(runs, repeat)
    results = {k: (times[k], peak_bytes(fn) if k != "floor" else 0) for k, fn in runs.items()}
    t0, m0 = results["ours"]
    mode = "1 pair" if max_tokens is None else f"{max_tokens} tokens"
    print(f"  (b) {name} {B}x{T}x{H}x{V} ({mode}): ours {t0 * 1e3:.0f} ms {m0 / 2**20:.0f} MiB", flush=True)
    return [
        name,
        mode,
        f"{B}×{T}×{H}×{V // 1000}k",
        f"{t0 * 1e3:.0f}",
        f"{m0 / 2**20:.0f}",
        f"{results['floor'][0] * 1e3:.0f}",
        f"{t0 / results['floor'][0]:.2f}",
        *(f"{t0 / results[k][0]:.2f}" for k in ("liger", "full", "trl")),
        *(f"{m0 / results[k][1]:.2f}" for k in ("liger", "full", "trl")),
        *([f"{t0 / results['ours_torch'][0]:.2f}"] if "ours_torch" in results else []),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16" if DEV.type == "cuda" else "float32",
        help="hidden states and LM head in (b) (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    ap.add_argument("--section", choices=["a", "b", "all"], default="all", help="run only (a) or (b)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"device: {machine()}")
    flags = f"{' --quick' if args.quick else ''} --dtype {args.dtype} --section {args.section}"
    print(f"command: python benchmarks/kernels.py{flags}\n", flush=True)
    sizes = [1024, 65536] if args.quick else [1024, 4096, 16384, 65536]
    if DEV.type == "cuda":
        shapes = [(4, 1024, 4096, 32000), (4, 1024, 4096, 128256), (8, 512, 2048, 128256), (1, 4096, 4096, 128256)]
        repeat = 5
    else:
        shapes = [(2, 128, 256, 32000), (8, 64, 128, 32000), (2, 128, 256, 128000)]
        repeat = 4
        if args.quick:
            shapes = shapes[:1]
    if args.section in ("a", "all"):
        print("(a) per-pair loss on log-probs, forward + backward; ratios are their time / PreferenceLoss's time")
        print("    (above 1: PreferenceLoss is faster)\n")
        for (_, what), tab in zip(PROTOCOLS, bench_per_pair(sizes)):
            print(f"    {what}\n")
            print(tab, "\n", flush=True)
    if args.section == "a":
        return 0
    print("(b) fused LM head + loss from hidden states, forward + backward (chunk_size = 1 pair for ours and Liger;")
    print("    ours: chunk '64 tokens' is max_chunk_tokens=64, two passes over quarter-pair slices)")
    print("    ratios are ours / theirs: below 1 means dpalogic is faster or smaller\n")
    print(f"    hidden states and LM head in {args.dtype}\n")
    print(bench_fused(shapes, repeat, dtype))
    if DEV.type == "cpu":
        print(
            "\nnote: CPU run with small shapes; the issue's shapes (e.g. B=4, T=1024, H=4096, V=128k) need a GPU: "
            "on CUDA this script runs them (the generated Triton kernel for (a); for (b) the chunked path with the Triton "
            "logsumexp/gradient kernels, and the same path in torch ops for comparison)."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
