"""Options as data: EngineOptions and ConvertOptions check their values in one place (one-line errors), every
engine command (chat, serve, bench, eval) exposes every engine knob as declared, and the command receives them
as one EngineOptions; Model builds from options, with keywords overriding them, and SparseLlama from its
llama_cpp.Llama keywords."""

from __future__ import annotations

import dataclasses
import pytest
import typer
import typer.main
from typer.testing import CliRunner

import cli
from converters.convert import ConvertOptions, default_output_path
from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.model import Model
from sparse_gguf.options import EngineOptions, declared
from sparse_gguf.sparsity import AttentionWindow

ENGINE_COMMANDS = ("chat", "serve", "bench", "eval")
OWN_CTX = {"bench": None, "eval": ("tokens per chunk", 512)}   # commands whose context is not the knob's


@pytest.mark.parametrize("knobs,message", [
    (dict(ffn_sparsity=1.5), "--ffn-sparsity must be in [0, 1), got 1.5"),
    (dict(ffn_sparsity=-0.1), "--ffn-sparsity must be in [0, 1), got -0.1"),
    (dict(attn_window=-3), "attention window settings must be >= 0, got sinks=0 window=-3 topk=0"),
    (dict(attn_sinks=-1, attn_topk=4), "attention window settings must be >= 0, got sinks=-1 window=0 topk=4"),
    (dict(output_candidates=-1), "output candidates must be >= 0, got -1"),
    (dict(n_ctx=-5), "context size must be positive, got -5"),
])
def test_engine_options_refuse_bad_values_in_one_line(knobs, message):
    with pytest.raises(SparseGGUFError) as e:
        EngineOptions(**knobs)
    assert str(e.value) == message and "\n" not in str(e.value)
    with pytest.raises(SparseGGUFError, match="must be"):      # replace checks again
        dataclasses.replace(EngineOptions(), **knobs)


def test_engine_options_accept_the_edges_and_are_frozen():
    o = EngineOptions(n_ctx=0, ffn_sparsity=0.0, attn_window=0, attn_topk=0, attn_sinks=0, output_candidates=0)
    assert o.ffn_sparsity == 0.0 and o.n_ctx == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.dense = True
    with pytest.raises(TypeError):
        EngineOptions(no_such_knob=1)
    assert {f.name for f in declared(EngineOptions)} == {f.name for f in dataclasses.fields(EngineOptions)}


def _options_of(command: str) -> dict[str, object]:
    """The click options of a command, by each of their flags."""
    click_cmd = typer.main.get_command(cli.app).commands[command]
    return {flag: p for p in click_cmd.params if isinstance(p, typer.core.TyperOption) for flag in p.opts}


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_every_engine_command_exposes_every_knob_as_declared(command):
    opts = _options_of(command)
    for f in declared(EngineOptions):
        flag = f.metadata["flags"][0]
        if f.name == "n_ctx" and command in OWN_CTX:
            own = OWN_CTX[command]
            assert (flag not in opts) if own is None else ((opts[flag].help, opts[flag].default) == own)
            continue
        p = opts[flag]
        assert sorted(p.opts) == sorted(f.metadata["flags"]), (command, p.opts)
        assert p.help == f.metadata["help"] and p.default == f.metadata["cli_default"], (command, flag)
    help_text = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"}).output
    for f in declared(EngineOptions):
        if f.name != "n_ctx" or command != "bench":
            assert all(flag in help_text for flag in f.metadata["flags"]), (command, f.name)


def test_a_command_receives_its_knobs_as_one_options_object():
    received = []
    app = typer.Typer()

    @app.command()
    @cli.takes_options(EngineOptions, without=("n_ctx",))
    def run(name: str = typer.Option("x", "--name"), *, options: EngineOptions):
        received.append((name, options))

    @app.command()
    def other():                     # two commands, so each is a subcommand
        pass

    runner = CliRunner()
    ok = runner.invoke(app, ["run", "--name", "y", "-t", "3", "--dense", "--ffn-sparsity", "0.25",
                             "--attn-window", "8", "--output-top", "16"])
    assert ok.exit_code == 0, ok.output
    assert received == [("y", EngineOptions(n_threads=3, dense=True, ffn_sparsity=0.25, attn_window=8,
                                            output_candidates=16))]
    assert runner.invoke(app, ["run", "--ctx", "8"]).exit_code != 0          # left out: no such option
    bad = runner.invoke(app, ["run", "--attn-topk", "-2"])
    assert isinstance(bad.exception, SparseGGUFError) and "attention window" in str(bad.exception)


def test_model_builds_from_options_and_keywords_override_them(tiny_model):
    path = tiny_model("llama", "Q8_0")
    m = Model(path, EngineOptions(n_ctx=48, attn_sinks=2, attn_window=8, attn_topk=8, output_candidates=16),
              n_ctx=32, attn_topk=4)
    assert m.n_ctx == 32 and m.attn == AttentionWindow(2, 8, 4) and m.options.n_ctx == 32
    d = Model(path, n_ctx=16, ffn_sparsity=0.0)               # a top-k rule of 0: the dense FFN
    assert d.dense and d.ffn_topk is None and d.options == EngineOptions(n_ctx=16, ffn_sparsity=0.0)
    with pytest.raises(SparseGGUFError, match="--ffn-sparsity"):
        Model(path, EngineOptions(), ffn_sparsity=1.0)


def test_sparse_llama_builds_the_options_from_its_llama_cpp_keywords(tiny_model):
    from sparse_gguf import SparseLlama

    llm = SparseLlama(str(tiny_model("llama", "Q8_0")), n_ctx=64, n_threads=1, n_gpu_layers=99, dense=True,
                      output_candidates=0, verbose=False)
    assert llm.model.options == EngineOptions(n_ctx=64, n_threads=1, dense=True, output_candidates=0)
    with pytest.raises(SparseGGUFError, match="--ffn-sparsity"):
        SparseLlama(str(tiny_model("llama", "Q8_0")), ffn_sparsity=2.0, verbose=False)


@pytest.mark.parametrize("fields,message", [
    (dict(sparsity=1.5), "--sparsity must be in [0, 1)"),
    (dict(budget_kl=0.0), "--budget-kl must be positive"),
    (dict(min_top1=1.5), "--min-top1 must be in [0, 1]"),
    (dict(predictors="maybe"), "--predictors must be one of auto, on, off"),
    (dict(output_candidates=-1), "--output-top must be >= 0"),
    (dict(calib_only=True), "--calib-only needs at least one --calib FILE"),
])
def test_convert_options_refuse_bad_values_in_one_line(fields, message):
    with pytest.raises(SparseGGUFError) as e:
        ConvertOptions(**fields)
    assert str(e.value) == message


def test_convert_options_paths(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"")
    o = ConvertOptions(calib_files=[str(tmp_path / "a.txt")], calib_only=True, sparsity=0.0)
    assert o.calib_files == (tmp_path / "a.txt",) and o.output is None
    assert o.output_path(src) == default_output_path(src) == tmp_path / "m.sparse.gguf"
    assert ConvertOptions(output=str(tmp_path / "o.gguf")).output_path(src) == tmp_path / "o.gguf"
    with pytest.raises(SparseGGUFError, match="overwrite the input"):
        ConvertOptions(output=tmp_path / "." / "m.gguf").output_path(src)
    with pytest.raises(SparseGGUFError, match="a.txt: cannot read calibration text"):
        o.calib_texts()
    (tmp_path / "a.txt").write_text("some text")
    assert o.calib_texts() == ["some text"]
