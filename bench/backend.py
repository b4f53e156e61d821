"""Local backend at the memory roofline: decode step vs k rows, mixed adapters, GEMM path, int8 weights.

    python bench/backend.py [--quick] [--smoke] [--int8] [--int4] [--out FILE.json]

One LocalBackend (shipped finance/engineering/product adapters, else random stand-ins) with
its default fast paths (docs/performance.md): the probed small-batch GEMM path, batched LoRA
for mixed adapters, merged weights for single-expert batches. Every generation is greedy
with EOS suppressed (``min_new_tokens``); a timing wrapper on the causal LM's ``forward``
records each call, so **prefill** (first call) and the **decode step** (median of the rest,
KV cache on) are measured separately. Within a section every variant runs in the same
process, interleaved (order alternates each round), after one warm-up; medians, and ratios
are medians of per-round ratios. The machine is shared and noisy: compare ratios.

1. decode step for k = 1..4 rows, each row a different expert (k=4 adds ``__base__``), and
   k base rows; chosen paths vs peft + torch's default GEMM. ``decode_step_ratio`` = chosen, experts.
2. mixed adapters: 3 rows on 3 adapters vs the same 3 rows on one adapter (chosen paths; and
   both on the batched-LoRA kernel, merged weights off; and peft's loop).
3. roofline: bytes of weights read per step / a large-copy bandwidth probe, vs the measured
   single-expert step (``roofline_fraction``: median over rounds of that round's roofline step,
   from a copy probe run inside section 1's round, / that round's single-expert step).
4. int8 weight-only base (``[base] quantize = "int8"``, LoRA in float32 on top): single-expert
   tokens/s vs float32, and per-token NLL of each domain's val responses for the base and every
   expert (``int8_nll_delta`` = the largest relative change). Opt-in (``--int8``): on this AVX2 CPU
   torch's int8 kernel is ~4.5x slower per layer than float32 (docs/performance.md), so it is slow.
   ``--int4``: the same for the 4-bit base (``quantize = "int4"``: Q4_1-style groups, lm_head int8;
   ``int4_over_fp32_tps``, ``int4_nll_delta``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

PROMPT = (
    "Our checkout page is slow after the last deploy. How should engineering profile it, "
    "and what should product tell customers?"
)


class StepTimer:
    """Times every ``forward`` of the causal LM under a backend (prefill = first call); ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before and after each call on an asynchronous device."""

    def __init__(self, model: Any, sync: Any = None) -> None:
        self.calls: list[float] = []
        orig = model.forward

        @functools.wraps(orig)  # keeps the signature, so generate passes what it passes unwrapped
        def forward(*a: Any, **kw: Any) -> Any:
            if sync is not None:
                sync()
            t = time.perf_counter()
            out = orig(*a, **kw)
            if sync is not None:
                sync()
            self.calls.append(time.perf_counter() - t)
            return out

        model.forward = forward

    def split(self) -> tuple[float, float]:
        calls, self.calls = self.calls, []
        return calls[0], statistics.median(calls[1:]) if len(calls) > 1 else calls[0]


@contextlib.contextmanager
def paths(local: Any, *, lora: str = "fast", merged: bool = True, gemm: bool = True, lean: bool = True,
          kernel: bool = True, c_step: bool = True) -> Iterator[None]:
    """Switch the fast paths for one measurement: lora "fast"/"peft", merged weights, GEMM path (``gemm``;
    ``kernel``: expertmix's small-row kernel within it), lean step (``c_step``: the whole step in C)."""
    from torch import nn

    from experts.backends.cpu_tuning import plan_kernels

    kern = plan_kernels(local.base.gemm)
    keep_kern = kern.enabled if kern is not None else None
    if kern is not None:
        kern.enabled = kernel and gemm

    fl = local.fast_lora
    keep = (fl.enabled, fl.merged_experts) if fl else None
    ld = getattr(local.base.model, "_expertmix_lean", None)
    keep_lean = (ld.enabled, ld.kernel_step) if ld is not None else None
    if ld is not None:
        ld.enabled = lean
        ld.kernel_step = ld.kernel_step if c_step else None
    patched = [] if gemm else [m for m in local.base.model.modules() if type(m) is nn.Linear and "forward" in vars(m)]
    saved = [m.forward for m in patched]
    for m in patched:
        del m.forward
    if fl:
        fl.enabled = lora == "fast"
        fl.merged_experts = fl.merged_experts if merged else 0
    try:
        yield
    finally:
        for m, f in zip(patched, saved):
            m.forward = f
        if fl and keep:
            fl.enabled, fl.merged_experts = keep
        if ld is not None and keep_lean is not None:
            ld.enabled, ld.kernel_step = keep_lean
        if kern is not None:
            kern.enabled = keep_kern


def copy_probe(mb: int = 256, reps: int = 3) -> Any:
    """A callable timing one large copy (median of ``reps``), as a variant of an interleaved round:
    returns ``(0.0, seconds)`` like :meth:`StepTimer.split`; GB/s = ``2 * mb MiB / seconds``."""
    import torch

    a = torch.ones(mb * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)

    def f() -> tuple[float, float]:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t)
        return 0.0, statistics.median(ts)

    f.bytes = 2 * a.numel() * 4  # type: ignore[attr-defined]  # read + write
    return f


def bandwidth_gbs(mb: int = 256, reps: int = 5, *, device: str = "cpu", sync: Any = None) -> float:
    """Memory bandwidth from a large copy on ``device`` (read + write), GB/s, median; ``sync`` waits
    for an asynchronous device."""
    import torch

    n = mb * 1024 * 1024 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(reps):
        if sync is not None:
            sync()
        t = time.perf_counter()
        b.copy_(a)
        if sync is not None:
            sync()
        ts.append(time.perf_counter() - t)
    return 2 * n * 4 / statistics.median(ts) / 1e9


def weight_bytes(model: Any) -> int:
    """Bytes of weights a decode step reads: every linear (lm_head included), counted once."""
    from torch import nn

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel() * m.weight.element_size()
            s = getattr(m, "scales", None)
            total += s.numel() * s.element_size() if s is not None else 0
    return total


def load_val(n: int) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for d in C.DOMAINS:
        rows = [json.loads(x) for x in (C.data_root() / "experts" / d / "val.jsonl").read_text().splitlines() if x.strip()]
        step = max(1, len(rows) // n)
        out[d] = [(r["instruction"], r["response"]) for r in rows[::step][:n]]
    return out


def stepwise_nll(local: Any, expert: str, messages: Any, response: str, max_tokens: int = 48) -> tuple[float, int]:
    """Like ``LocalBackend.score_nll``, but each response token is fed as a decode step (one row, KV
    cache), so the decode path's numbers are scored (the 4-bit kernel rounds activations to int8
    there; a whole-sequence forward takes the dequantized prefill path). First ``max_tokens`` tokens."""
    import torch
    from transformers import DynamicCache

    prompt = local.encode_prompt(messages)
    full = local.encode_prompt([*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
    target = full[len(prompt):][:max_tokens]
    kw: dict[str, Any] = {"adapter_names": [expert]} if local._peft else {}
    nll = 0.0
    with local._lock, torch.inference_mode():
        cache = DynamicCache()
        out = local.model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, **kw)
        for tok in target:
            logits = out.logits[0, -1].float()
            nll += float(torch.logsumexp(logits, 0) - logits[tok])
            out = local.model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True, **kw)
    return nll, len(target)


def nll_table(local: Any, val: dict[str, list[tuple[str, str]]], experts: list[str], *,
              stepwise: bool = False) -> dict[str, dict[str, float]]:
    """Per-token NLL of each domain's val responses under each expert (and the base); ``stepwise``:
    through decode steps (:func:`stepwise_nll`) instead of one forward."""
    res: dict[str, dict[str, float]] = {}
    for e in experts:
        res[e] = {}
        for d, rows in val.items():
            s = n = 0.0
            for q, a in rows:
                msgs = [{"role": "user", "content": q}]
                x, k = stepwise_nll(local, e, msgs, a) if stepwise else local.score_nll(e, msgs, a)
                s, n = s + x, n + k
            res[e][d] = s / max(n, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    if not any("--smoke" in a.option_strings for a in ap._actions):
        ap.add_argument("--smoke", action="store_true", help="seconds: k = 1, 2, 1 round, 4 tokens, no int8")
    ap.add_argument("--int8", action="store_true", help="also measure the int8 weight-only base (slow here)")
    ap.add_argument("--int4", action="store_true", help="also measure the 4-bit weight base (quantize = \"int4\")")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 3 --quick, else 7)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per row (default 16 --quick, else 32)")
    args = ap.parse_args(argv)
    reps = 1 if args.smoke else args.reps or (3 if args.quick else 7)
    n_tok = 4 if args.smoke else args.max_new_tokens or (16 if args.quick else 32)
    warm = 0 if args.smoke else 1
    ks = (1, 2) if args.smoke else (1, 2, 3, 4)
    t_start = time.perf_counter()

    from experts.backends.base import GenerationConfig
    from experts.backends.local import LocalBackend
    from experts.models import FastOptions, load_base
    from experts.registry import ExpertSpec

    adapters, kind = C.resolve_adapters(args.adapters)
    specs = [ExpertSpec(name=d, adapter=adapters / d) for d in C.DOMAINS]
    # every round repeats one prompt: the prompt-prefix cache would serve all of it but its last block, and
    # the prefill column is about computing a prompt (bench/speed.py measures the cache)
    local = LocalBackend(load_base(options=FastOptions(prefix_cache_mb=0)), specs)
    C.set_threads(args.threads)
    info = C.machine_info()
    C.force_length(local)
    timer = StepTimer(local.base.model)
    cfg = GenerationConfig(max_new_tokens=n_tok)
    msgs = [{"role": "user", "content": PROMPT}]
    experts_k = {k: ([*C.DOMAINS, "__base__"])[:k] for k in ks}

    def measure(rows: list[str], **sw: Any):
        def f() -> tuple[float, float]:
            with paths(local, **sw):
                local.generate([(r, msgs) for r in rows], cfg)
            return timer.split()
        return f

    # -- 1. decode step vs k ---------------------------------------------------------------------------
    fns = {}
    for k in ks:
        fns[f"experts_k{k}"] = measure(experts_k[k])
        fns[f"experts_k{k}_peft_default"] = measure(experts_k[k], lora="peft", gemm=False, lean=False)
        fns[f"base_k{k}"] = measure(["__base__"] * k)
        fns[f"base_k{k}_default"] = measure(["__base__"] * k, gemm=False, lean=False)
    fns["experts_k1_transformers_step"] = measure(experts_k[1], lean=False)  # chosen paths but transformers' step
    fns["experts_k1_mkl"] = measure(experts_k[1], kernel=False)  # chosen paths but MKL's products
    fns["experts_k1_python_step"] = measure(experts_k[1], c_step=False)  # the lean step in Python, kernel products
    fns["experts_k2_mkl"] = measure(experts_k[2], kernel=False)
    # the roofline's bandwidth, measured in every round beside the steps it divides (the copy bandwidth of
    # this shared host moved 14-21 GB/s between runs; one probe at another time mismatched the steps)
    probe = fns["copy_probe"] = copy_probe(64 if args.smoke else 256)
    C.log(f"[1/4] decode step: {len(fns) - 1} variants + a copy probe x {reps} rounds, {n_tok} tokens ...")
    _, res = _interleaved_results(fns, reps, warm)
    copies = [s for _, s in res.pop("copy_probe")]
    step = {n: C.med([s for _, s in v]) for n, v in res.items()}
    prefill = {n: C.med([p for p, _ in v]) for n, v in res.items()}

    def ratio(name: str, k: int) -> float:
        return C.paired_ratio([s for _, s in res[f"{name.format(k=k)}"]], [s for _, s in res[name.format(k=1)]])

    per_path = {p: {str(k): ratio(p, k) for k in ks} for p in
                ("experts_k{k}", "experts_k{k}_peft_default", "base_k{k}", "base_k{k}_default")}
    decode_ratio = {str(k): per_path["experts_k{k}"][str(k)] for k in ks if k > 1}

    # -- 2. mixed vs single adapter -----------------------------------------------------------------------
    rows_mixed, rows_one = list(C.DOMAINS), [C.DOMAINS[0]] * 3
    fns = {
        "mixed": measure(rows_mixed), "single": measure(rows_one),
        "mixed_lora": measure(rows_mixed, merged=False), "single_lora": measure(rows_one, merged=False),
        "mixed_peft": measure(rows_mixed, lora="peft"), "single_peft": measure(rows_one, lora="peft"),
    }
    C.log(f"[2/4] mixed vs single adapter: {len(fns)} variants x {reps} rounds ...")
    _, mres = _interleaved_results(fns, reps, warm)

    def mratio(a: str, b: str) -> float:
        return C.paired_ratio([s for _, s in mres[a]], [s for _, s in mres[b]])

    mixed = {
        "chosen": mratio("mixed", "single"), "batched_lora_kernel": mratio("mixed_lora", "single_lora"),
        "peft": mratio("mixed_peft", "single_peft"), "mixed_fast_over_peft": mratio("mixed", "mixed_peft"),
        "step_ms": {n: round(1e3 * C.med([s for _, s in v]), 2) for n, v in mres.items()},
    }

    # -- 3. roofline ------------------------------------------------------------------------------------------
    bws = [probe.bytes / c / 1e9 for c in copies]
    bw = C.med(bws)
    nbytes = weight_bytes(local.base.model)
    roof_s = nbytes / (bw * 1e9)
    roofs = [nbytes / (x * 1e9) for x in bws]  # each round's roofline step, from that round's probe
    one = step["experts_k1"]
    roofline = {"bandwidth_gbs": bw, "bandwidth_gbs_rounds": [round(x, 2) for x in bws], "weight_bytes": nbytes,
                "roofline_step_ms": roof_s * 1e3,
                "single_expert_step_ms": one * 1e3,
                "fraction": C.paired_ratio(roofs, [s for _, s in res["experts_k1"]]),
                "base_step_ms": step["base_k1"] * 1e3,
                "base_fraction": C.paired_ratio(roofs, [s for _, s in res["base_k1"]]),
                "single_expert_transformers_step_ms": step["experts_k1_transformers_step"] * 1e3,
                "lean_over_transformers_step": C.paired_ratio([s for _, s in res["experts_k1"]],
                                                              [s for _, s in res["experts_k1_transformers_step"]]),
                "single_expert_python_step_ms": step["experts_k1_python_step"] * 1e3,
                "c_over_python_step": C.paired_ratio([s for _, s in res["experts_k1"]],
                                                     [s for _, s in res["experts_k1_python_step"]]),
                "single_expert_mkl_step_ms": step["experts_k1_mkl"] * 1e3,
                "kernel_over_mkl_step": C.paired_ratio([s for _, s in res["experts_k1"]],
                                                       [s for _, s in res["experts_k1_mkl"]]),
                "experts_k2_mkl_step_ms": step["experts_k2_mkl"] * 1e3,
                "experts_k2_over_k1_mkl": C.paired_ratio([s for _, s in res["experts_k2_mkl"]],
                                                         [s for _, s in res["experts_k1_mkl"]])}

    # -- 4. int8 --------------------------------------------------------------------------------------------
    quant: dict[str, dict[str, Any]] = {}
    quantized: dict[str, tuple[Any, StepTimer]] = {}
    for mode in [m for m in ("int8", "int4") if getattr(args, m) and not args.smoke]:
        C.log(f"[4/4] {mode} base: load, tokens/s vs float32, NLL on val samples ...")
        q = LocalBackend(load_base(options=FastOptions(quantize=mode, prefix_cache_mb=0)), specs)
        C.force_length(q)
        quantized[mode] = (q, StepTimer(q.base.model))
        quant[mode] = _quant_section(mode, local, timer, *quantized[mode], msgs, cfg, reps, warm, bw,
                                     n_val=3 if args.quick else 8)
    int8, int4 = quant.get("int8"), quant.get("int4")

    llama = None if args.smoke else _llama_cpp_section(local, timer, msgs, cfg, reps, warm, quantized=quantized)

    _print(n_tok, reps, warm, kind, ks, step, prefill, per_path, mixed, roofline, quant, local, info)
    if llama:
        print()
        print(C.table(["llama.cpp side by side (same prompt, greedy, EOS suppressed)", "value"], [
            ["llama.cpp decode step (ms), Q4_1 GGUF of the base", f"{llama['llama_cpp_step_ms']:.1f}"],
            ["ours: single expert (merged) decode step (ms), float32", f"{llama['ours_step_ms']:.1f}"],
            ["our decode tokens/s / llama.cpp's", f"{llama['ours_over_llama_cpp_tps']:.2f}x"],
            *[row for m in ("int8", "int4") if f"ours_{m}_step_ms" in llama for row in (
                [f"ours: single expert decode step (ms), {m} weights", f"{llama[f'ours_{m}_step_ms']:.1f}"],
                [f"our {m} decode tokens/s / llama.cpp's", f"{llama[f'ours_{m}_over_llama_cpp_tps']:.2f}x"])],
        ]))
    elif not args.smoke:
        print("llama.cpp side by side: skipped (llama-cpp-python not installed, or the base is not the default GGUF)")
    result = {
        "decode_step_ratio": decode_ratio,
        "mixed_over_single_adapter": mixed["chosen"],
        "roofline_fraction": roofline["fraction"],
        "int8_over_fp32_tps": int8["int8_over_fp32_tps"] if int8 else None,
        "int8_nll_delta": int8["nll_delta_max"] if int8 else None,
        "int4_over_fp32_tps": int4["int4_over_fp32_tps"] if int4 else None,
        "int4_over_fp32_decode_tps": int4["int4_over_fp32_decode_tps"] if int4 else None,
        "int4_nll_delta": int4["nll_delta_max"] if int4 else None,
        "decode_step_ratio_per_path": per_path,
        "decode_step_ms": {n: round(v * 1e3, 2) for n, v in step.items()},
        "prefill_ms": {n: round(v * 1e3, 2) for n, v in prefill.items()},
        "mixed": mixed, "roofline": roofline, "int8": int8, "int4": int4,
        "llama_cpp": llama,  # optional extra: None when llama-cpp-python is not installed
        "paths": _paths(local),
        "settings": {"quick": args.quick, "smoke": args.smoke, "reps": reps, "warmup_rounds": warm,
                     "max_new_tokens": n_tok, "eos": "suppressed", "decoding": "greedy", "prompt": PROMPT,
                     "order": "interleaved, alternating forward/reverse each round"},
        "adapters": _relative(C.adapter_info(adapters, kind)),
        "machine": info,
        "time_s": round(time.perf_counter() - t_start, 1),
    }
    C.write_json(args.out, result)
    return 0


def _interleaved_results(fns: dict[str, Any], reps: int, warm: int) -> tuple[Any, dict[str, list[Any]]]:
    names = list(fns)
    for _ in range(warm):
        for n in names:
            fns[n]()
    res: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            res[n].append(fns[n]())
    return None, res


def _llama_cpp_section(local: Any, timer: StepTimer, msgs: Any, cfg: Any, reps: int, warm: int, *,
                       quantized: dict[str, tuple[Any, StepTimer]]) -> dict[str, Any] | None:
    """Decode step of llama.cpp on the GGUF the default base comes from vs ours (float32, and each
    quantized base measured), interleaved; None when ``llama_cpp`` is not importable or the base is
    not the default."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import torch

    from experts.models import DEFAULT_BASE, _default_gguf

    if local.base.name != DEFAULT_BASE:
        return None
    C.log("[+] llama.cpp side by side ...")
    llm = llama_cpp.Llama(model_path=str(_default_gguf()), n_ctx=512, n_threads=torch.get_num_threads(),
                          n_batch=512, verbose=False)
    prompt = local.encode_prompt(msgs)
    n = cfg.max_new_tokens
    no_eos = {llm.token_eos(): -1e9}

    def llama_step() -> float:
        def run(k: int) -> float:
            llm.reset()
            t = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=k, temperature=0.0, top_k=1, logit_bias=no_eos)
            assert out["usage"]["completion_tokens"] == k, out["usage"]
            return time.perf_counter() - t
        return (run(n + 1) - run(1)) / n  # per decode step: the prefill and first token cancel

    expert = C.DOMAINS[0]
    ours = {"ours": (local, timer), **{f"ours_{m}": bt for m, bt in quantized.items()}}
    steps: dict[str, list[float]] = {"llama_cpp": [], **{n: [] for n in ours}}
    for _, t in ours.values():
        t.split() if t.calls else None
    names = list(steps)
    for r in range(warm + reps):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in ours:
                backend, t = ours[name]
                backend.generate([(expert, msgs)], cfg)
                s = t.split()[1]
            else:
                s = llama_step()
            if r >= warm:
                steps[name].append(s)
    out = {"version": getattr(llama_cpp, "__version__", None), "gguf": _default_gguf().name,
           "llama_cpp_step_ms": C.med(steps["llama_cpp"]) * 1e3}
    for name in ours:
        out[f"{name}_step_ms"] = C.med(steps[name]) * 1e3
        out[f"{name}_over_llama_cpp_tps"] = C.paired_ratio(steps["llama_cpp"], steps[name])
    return out


def _quant_section(mode: str, local: Any, timer: StepTimer, q: Any, qtimer: StepTimer, msgs: Any, cfg: Any,
                   reps: int, warm: int, bw: float, *, n_val: int) -> dict[str, Any]:
    expert = C.DOMAINS[0]
    ts: dict[str, list[float]] = {"fp32": [], mode: []}
    steps: dict[str, list[float]] = {"fp32": [], mode: []}
    runs, timers = {"fp32": local, mode: q}, {"fp32": timer, mode: qtimer}
    timer.split() if timer.calls else None
    for r in range(warm + reps):
        for name in ("fp32", mode) if r % 2 == 0 else (mode, "fp32"):
            g = runs[name].generate([(expert, msgs)], cfg)[0]
            _, step = timers[name].split()
            if r >= warm:
                ts[name].append(g.tokens / g.latency_s)
                steps[name].append(step)
    val = load_val(n_val)
    names = ["__base__", *C.DOMAINS]
    # int4's decode steps round activations (prefill does not): score it through decode steps, both sides
    stepwise = mode == "int4"
    nll32, nll8 = nll_table(local, val, names, stepwise=stepwise), nll_table(q, val, names, stepwise=stepwise)
    delta = {e: {d: (nll8[e][d] - nll32[e][d]) / nll32[e][d] for d in val} for e in names}
    worst = max(abs(v) for row in delta.values() for v in row.values())
    nbytes = weight_bytes(q.base.model)
    return {
        "tokens_per_s": {k: C.med(v) for k, v in ts.items()},
        f"{mode}_over_fp32_tps": C.paired_ratio(ts[mode], ts["fp32"]),
        "decode_step_ms": {k: round(C.med(v) * 1e3, 2) for k, v in steps.items()},
        f"{mode}_over_fp32_decode_tps": C.paired_ratio(steps["fp32"], steps[mode]),
        "weight_bytes": nbytes, "roofline_step_ms": nbytes / (bw * 1e9) * 1e3,
        "roofline_fraction": nbytes / (bw * 1e9) / C.med(steps[mode]),
        "nll_fp32": nll32, f"nll_{mode}": nll8, "nll_rel_delta": delta, "nll_delta_max": worst,
        "nll_gate_1pct": worst <= 0.01, "val_rows_per_domain": n_val,
        "nll_scored": "decode steps, first 48 response tokens" if stepwise else "one forward over prompt + response",
    }


def _print(n_tok: int, reps: int, warm: int, kind: str, ks: Any, step: dict, prefill: dict, per_path: dict,
           mixed: dict, roof: dict, quant: dict[str, dict], local: Any, info: dict) -> None:
    print(f"Local backend, {n_tok} new tokens per row (EOS suppressed), greedy; median of {reps} interleaved rounds "
          f"after {warm} warm-up; noisy shared machine: compare ratios; adapters: {kind}; paths: {_paths(local)}")
    print()
    print("Decode step (KV cache) and prefill vs k rows; chosen paths vs peft + torch default GEMM:")
    rows = []
    for k in ks:
        rows.append([k, "+".join(([*C.DOMAINS, "__base__"])[:k]),
                     f"{step[f'experts_k{k}'] * 1e3:.1f} ({per_path['experts_k{k}'][str(k)]:.2f}x)",
                     f"{step[f'experts_k{k}_peft_default'] * 1e3:.1f} ({per_path['experts_k{k}_peft_default'][str(k)]:.2f}x)",
                     f"{step[f'base_k{k}'] * 1e3:.1f} ({per_path['base_k{k}'][str(k)]:.2f}x)",
                     f"{step[f'base_k{k}_default'] * 1e3:.1f} ({per_path['base_k{k}_default'][str(k)]:.2f}x)",
                     f"{prefill[f'experts_k{k}'] * 1e3:.0f} / {prefill[f'experts_k{k}_peft_default'] * 1e3:.0f}"])
    print(C.table(["k", "experts", "step ms (vs k=1), chosen", "peft + default GEMM", "base rows, chosen",
                   "base rows, default GEMM", "prefill ms chosen / peft+default"], rows))
    print()
    print(C.table(["3 rows: mixed adapters / one adapter", "ratio"], [
        ["chosen paths (one adapter runs on merged weights)", f"{mixed['chosen']:.2f}x"],
        ["both on the batched-LoRA kernel (merged off)", f"{mixed['batched_lora_kernel']:.2f}x"],
        ["peft adapter_names loop", f"{mixed['peft']:.2f}x"],
        ["mixed: batched LoRA / peft", f"{mixed['mixed_fast_over_peft']:.2f}x"],
    ]))
    print()
    print(C.table(["roofline", "value"], [
        ["copy bandwidth (GB/s)", f"{roof['bandwidth_gbs']:.1f}"],
        ["weights read per step (MB)", f"{roof['weight_bytes'] / 1e6:.0f}"],
        ["roofline step (ms)", f"{roof['roofline_step_ms']:.1f}"],
        ["single expert step (ms) / fraction", f"{roof['single_expert_step_ms']:.1f} / {roof['fraction']:.2f}"],
        ["base step (ms) / fraction", f"{roof['base_step_ms']:.1f} / {roof['base_fraction']:.2f}"],
        ["single expert, transformers' step (lean off) (ms)", f"{roof['single_expert_transformers_step_ms']:.1f}"],
        ["lean step / transformers' step", f"{roof['lean_over_transformers_step']:.2f}x"],
        ["single expert, lean step in Python (not C) (ms)", f"{roof['single_expert_python_step_ms']:.1f}"],
        ["C step / Python lean step", f"{roof['c_over_python_step']:.2f}x"],
        ["single expert with MKL's products instead of the kernel (ms)", f"{roof['single_expert_mkl_step_ms']:.1f}"],
        ["kernel step / MKL step (single expert)", f"{roof['kernel_over_mkl_step']:.2f}x"],
        ["experts k=2 / k=1 with MKL's products", f"{roof['experts_k2_over_k1_mkl']:.2f}x"],
    ]))
    for m, qs in quant.items():
        print()
        what = "int8 weight-only base" if m == "int8" else "4-bit base (Q4_1 groups, lm_head int8)"
        print(C.table([f"{what} (LoRA float32)", "value"], [
            [f"tokens/s {m} / fp32 (whole generation, prefill included)",
             (f"{qs['tokens_per_s'][m]:.1f} / {qs['tokens_per_s']['fp32']:.1f} "
              f"({qs[f'{m}_over_fp32_tps']:.2f}x)")],
            [f"decode step ms {m} / fp32 (decode tokens/s ratio)",
             (f"{qs['decode_step_ms'][m]:.1f} / {qs['decode_step_ms']['fp32']:.1f} "
              f"({qs[f'{m}_over_fp32_decode_tps']:.2f}x)")],
            [f"{m} roofline fraction (its bytes / copy bandwidth)", f"{qs['roofline_fraction']:.2f}"],
            ["worst relative per-token NLL change (base + experts x domains)",
             f"{qs['nll_delta_max'] * 100:.2f}% (gate 1%: {'pass' if qs['nll_gate_1pct'] else 'FAIL'})"],
        ]))
    print(C.machine_line(info))


def _relative(info: dict) -> dict:
    """No absolute machine paths in results JSON."""
    p = Path(info.get("path", ""))
    if p.is_absolute():
        try:
            info["path"] = str(p.relative_to(C.REPO))
        except ValueError:
            info["path"] = p.name
    return info


def _paths(local: Any) -> dict[str, Any]:
    plan = getattr(local.base, "gemm", None)
    fl = getattr(local, "fast_lora", None)
    opts = getattr(local.base, "options", None)
    return {"gemm": plan.path if plan else None, "gemm_max_rows": plan.max_rows if plan else None,
            "gemm_source": plan.source if plan else None, "fast_lora": fl is not None,
            "merged_experts": fl.merged_experts if fl else 0, "quantize": opts.quantize if opts else "none",
            "lean_decode": getattr(local.base.model, "_expertmix_lean", None) is not None,
            "cpu_kernel": bool(plan and plan.kernel)}


if __name__ == "__main__":
    raise SystemExit(main())
