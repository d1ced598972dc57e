"""The `padrec` command as a user meets it: help with defaults, one-line errors (no traceback) for bad input, a
missing extra or device, and refused vacuous requests."""
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from padrec_export.checkpoint import save_target
from padrec_export.cli import main
from padrec_export.parity import run_parity
from padrec_export.pipeline import export_checkpoints
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.errors import CheckpointError, InputError, ManifestError
from padrec_runtime.manifest import load_manifest

EXPORT_SIDE = ("export", "build", "demo", "train", "train-draft", "evaluate", "parity", "bench", "recommend", "serve",
               "client")


def _invoke(*args):
    return CliRunner().invoke(main, list(args), terminal_width=1000, max_content_width=1000)


def _one_line_error(result, code: int = 1) -> str:
    """The output of a refused command: the expected exit code, a message, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("command", EXPORT_SIDE)
def test_help_shows_every_flag_with_help_and_its_default(command):
    """Every option of `padrec COMMAND --help` has a help line, and every option with a default shows it."""
    cmd = main.commands[command]
    ctx = click.Context(cmd, parent=click.Context(main, **main.context_settings), info_name=command)
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        names, text = param.get_help_record(ctx)
        assert param.help and text.strip(), f"{command} {names}: no help text"
        if not param.required and not param.is_flag and param.default is not None:
            assert "default: " in text, f"{command} {names}: default not shown in {text!r}"
    out = _invoke(command, "--help").output
    assert out.startswith("Usage: ") and "[default: " in out


def test_short_help_and_version_on_the_group():
    assert _invoke("-h").output.startswith("Usage: ")  # CliRunner names the program "main"
    out = _invoke("--version")
    assert out.exit_code == 0 and out.output.startswith("padrec, version ")


def test_build_defaults_to_the_builder_pip_installs():
    builder = next(p for p in main.commands["build"].params if p.name == "builder")
    assert builder.default == "tensorrt_rtx"


@pytest.mark.parametrize("args", [
    ("parity", "--engines", ".", "--target", ".", "--histories", "0"),
    ("demo", "--users", "-2"),
    ("bench", "--engines", ".", "--repeats", "0"),
    ("train", "--out", ".", "--epochs", "0"),
])
def test_vacuous_requests_are_refused(args):
    out = _one_line_error(_invoke(*args), code=2)
    assert "is not in the range" in out


def test_vacuous_requests_are_refused_by_the_functions_too():
    from padrec_export.bench import run_bench
    from padrec_export.demo import run_demo
    with pytest.raises(InputError, match="--histories: got 0"):
        run_parity("nowhere", "nowhere", n_histories=0)
    with pytest.raises(InputError, match="repeats 0"):
        run_bench("nowhere", repeats=0)
    with pytest.raises(InputError, match="--users: got -2"):
        run_demo(users=-2)


def test_bench_batch_message_names_batch_sizes():
    out = _one_line_error(_invoke("bench", "--engines", ".", "--batch", "abc"), code=2)
    assert "batch sizes" in out and "item ids" not in out


def test_export_of_a_missing_target_says_the_directory_does_not_exist(tmp_path):
    out = _one_line_error(_invoke("export", "--target", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "e")),
                          code=2)
    assert "does not exist" in out and "padrec.json" not in out
    with pytest.raises(CheckpointError, match="directory not found"):
        export_checkpoints(tmp_path / "nonexistent", None, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_a_file_given_as_engines_is_named_a_file(tmp_path):
    f = tmp_path / "manifest.json"
    f.write_text("{}")
    with pytest.raises(ManifestError, match="is a file") as err:
        load_manifest(f)
    assert "manifest.json/manifest.json" not in str(err.value)
    with pytest.raises(ManifestError, match="directory not found"):
        load_manifest(tmp_path / "nowhere")
    out = _one_line_error(_invoke("recommend", "--engines", str(f), "--history", "1,2"))
    assert "is a file" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine trains on cuda")
def test_train_on_cuda_without_cuda_is_one_line(tmp_path):
    out = _one_line_error(_invoke("train", "--out", str(tmp_path / "m"), "--device", "cuda"))
    assert "no CUDA GPU" in out and "--device cpu" in out
    assert not (tmp_path / "m").exists()  # refused before anything is prepared


def test_parity_against_another_target_names_the_mismatch(engines_master, tmp_path):
    _, other, _ = tiny_setup(TinySpec(seed=1, layers=1))
    save_target(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="layers 1 vs 2"):
        run_parity(engines_master, tmp_path / "other", n_histories=1, progress=False)
    out = _one_line_error(_invoke("parity", "--engines", str(engines_master), "--target", str(tmp_path / "other")))
    assert "not the checkpoint the engines' target graph came from" in out


BLOCK = ("import sys, importlib.abc\n"
         "class B(importlib.abc.MetaPathFinder):\n"
         "    def find_spec(self, n, p=None, t=None):\n"
         "        if n.split('.')[0] in {blocked!r}: raise ImportError('blocked')\n"
         "sys.meta_path.insert(0, B())\n"
         "from padrec_export.cli import main\n"
         "main(sys.argv[1:])\n")


def _without(blocked: set, *args, env=None):
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked), *args], capture_output=True,
                          text=True, env=env)


def test_runtime_only_install_names_the_export_extra(tmp_path):
    """torch absent: each torch-side command is one line naming the extra, not a ModuleNotFoundError."""
    import os
    d = str(tmp_path)
    env = dict(os.environ, PADREC_CACHE=str(tmp_path / "cache"))  # an empty cache: the demo must export
    for args in (["export", "--target", d, "--out", d + "/e"], ["train", "--out", d + "/m"], ["demo"],
                 ["parity", "--engines", d, "--target", d], ["evaluate", "--models", d]):
        out = _without({"torch"}, *args, env=env)
        assert out.returncode == 1, (args, out.stderr)
        assert "pip install '.[export]' (in the padrec checkout)" in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_bench_plot_without_matplotlib_fails_before_the_run(tmp_path):
    out = _without({"matplotlib"}, "bench", "--engines", str(tmp_path / "nowhere"), "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 1 and "pip install '.[plot]' (in the padrec checkout)" in out.stderr, out.stderr
    assert "manifest" not in out.stderr  # refused before the engines were opened


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """(target dir, draft dir) of the tiny model as `padrec export` reads them (depth 3: 4 tokens per item)."""
    from padrec_export.checkpoint import save_draft
    cat, target, draft = tiny
    root = tmp_path_factory.mktemp("cli_checkpoints")
    save_target(target, root / "t", extra={"layout": cat.layout.to_json()})
    cat.save(root / "t" / "catalogue.json")
    save_draft(draft, root / "d")
    return root / "t", root / "d"


def _export(checkpoints, out, *args, draft=True):
    t, d = checkpoints
    return _invoke("export", "--target", str(t), *(["--draft", str(d)] if draft else []), "--out", str(out), *args)


@pytest.mark.parametrize("seq_len", ["8", "40", "55"])
def test_export_refuses_a_max_seq_len_below_the_default_request(checkpoints, tmp_path, seq_len):
    """2 items of 4 tokens: prompt 1 + 2 x 4 = 9, the default 10-item list 40, a chain round of K=3 6, and 1:
    56 KV positions, named in the message; refused before anything is written."""
    out = _one_line_error(_export(checkpoints, tmp_path / "e", "--max-seq-len", seq_len, "--max-history", "2",
                                  "--draft-steps", "3"))
    assert f"--max-seq-len: got {seq_len} | expected at least 56" in out and "--max-seq-len 56" in out
    assert not (tmp_path / "e").exists()


def test_export_without_a_draft_needs_no_speculation_room(checkpoints, tmp_path):
    out = _one_line_error(_export(checkpoints, tmp_path / "e", "--max-seq-len", "50", "--max-history", "2",
                                  draft=False))
    assert "expected at least 51" in out  # 9 + 40 + one target step + 1


def test_export_at_the_smallest_max_seq_len_serves_the_default_request(checkpoints, tmp_path):
    """The bound is the runtime's own: engines of exactly 56 positions take a 2-item history with the defaults."""
    from padrec_runtime import Recommender
    res = _export(checkpoints, tmp_path / "e", "--max-seq-len", "56", "--max-history", "2", "--draft-steps", "3",
                  "--no-in-place")
    assert res.exit_code == 0, res.output
    assert "an earlier export" not in res.output
    rec = Recommender(tmp_path / "e")
    got = rec.recommend([rec.catalogue.item_ids[:2].tolist()])
    assert len(got.lists[0].item_ids) == 10
    again = _export(checkpoints, tmp_path / "e", "--max-seq-len", "56", "--max-history", "2", "--draft-steps", "3",
                    "--no-in-place")  # a second export into the same directory says it replaces the first
    assert again.exit_code == 0 and ", replacing an earlier export" in again.output
    target_only = _export(checkpoints, tmp_path / "e", "--max-seq-len", "56", "--max-history", "2", draft=False)
    assert target_only.exit_code == 0, target_only.output  # the earlier export's draft graphs go with it
    assert not list((tmp_path / "e").glob("draft*")) and (tmp_path / "e" / "target.onnx").exists()


@pytest.mark.parametrize("option, value", [("--max-batch", "100000"), ("--max-history", "65537"),
                                           ("--max-seq-len", str((1 << 20) + 1))])
def test_export_numbers_beyond_the_manifests_range_are_refused_up_front(checkpoints, tmp_path, option, value):
    out = _one_line_error(_export(checkpoints, tmp_path / "e", option, value), code=2)
    assert f"'{option}': {value} is not in the range" in out
    assert not (tmp_path / "e").exists()


def _unwritable(tmp_path) -> list:
    """Output paths no process can create: under a file, and (Linux) under /proc, which even root cannot."""
    (tmp_path / "file").write_text("")
    paths = [str(tmp_path / "file" / "x")]
    if __import__("os").path.isdir("/proc/self"):
        paths.append("/proc/x")
    return paths


def test_export_and_train_refuse_an_unwritable_out_before_any_work(checkpoints, tmp_path):
    for path in _unwritable(tmp_path):
        for out in (_export(checkpoints, path), _invoke("train", "--out", path, "--epochs", "1")):
            text = _one_line_error(out)
            assert text.startswith("Error: --out: ") and path in text, text
            assert "cannot write" in text or "is a file, not a directory" in text, text


def test_export_refuses_an_out_that_is_a_file(checkpoints, tmp_path):
    (tmp_path / "e").write_text("")
    assert "--out: got" in _one_line_error(_export(checkpoints, tmp_path / "e"))


@pytest.mark.parametrize("foreign", [{"target.onnx.data": "mine", "draft.plan": "mine"},
                                     {"manifest.json": '{"name": "my webapp"}', "target.onnx": "mine"},
                                     {"manifest.json": "not json"}, {"manifest.json": "[1]"}])
def test_export_refuses_an_out_holding_files_that_are_not_an_export_and_leaves_them(checkpoints, tmp_path, foreign):
    """An export replaces and removes files by name: into a directory that is not an earlier export (no padrec
    manifest) it would overwrite or delete the user's files, so it is refused before any work, the files kept."""
    out = tmp_path / "e"
    out.mkdir()
    for name, text in foreign.items():
        (out / name).write_text(text)
    msg = _one_line_error(_export(checkpoints, out))
    assert "holds files that are not a padrec export" in msg and sorted(foreign)[0] in msg, msg
    assert {p.name: p.read_text() for p in out.iterdir()} == foreign
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary export left beside it
    with pytest.raises(InputError, match="not a padrec export"):
        export_checkpoints(*checkpoints, out)


def test_an_export_over_an_earlier_one_keeps_the_users_own_files(checkpoints, tmp_path):
    out = tmp_path / "e"
    assert _export(checkpoints, out, "--no-in-place").exit_code == 0
    (out / "notes.txt").write_text("mine")
    again = _export(checkpoints, out, "--no-in-place", draft=False)
    assert again.exit_code == 0 and ", replacing an earlier export" in again.output, again.output
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob("draft*"))


@pytest.mark.parametrize("args", [("export", "--target", ".", "--out", ""), ("train", "--out", " "),
                                  ("bench", "--engines", ".", "--json", ""), ("bench", "--engines", ".", "--plot", ""),
                                  ("parity", "--engines", ".", "--target", ".", "--report", "")])
def test_an_empty_output_path_is_refused(args, tmp_path, monkeypatch):
    """An empty path (a variable left unset) would write into the working directory, or nowhere without a word."""
    monkeypatch.chdir(tmp_path)
    out = _one_line_error(_invoke(*args), code=2)
    assert "empty | expected a path to write" in out, out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_refuses_unwritable_report_paths_before_opening_the_engines(tmp_path, flag):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    paths = _unwritable(tmp_path) + [str(tmp_path) + "/"]
    for path in paths:
        out = _one_line_error(_invoke("bench", "--engines", str(tmp_path / "nowhere"), flag, path))
        assert out.startswith(f"Error: {flag}: ") and "manifest" not in out, out  # before the engines open
    assert "a directory | expected a file path" in out


def test_the_writability_probe_leaves_nothing_behind(tmp_path):
    from padrec_export.cli import check_writable
    (tmp_path / "r.json").write_text("kept")
    check_writable(tmp_path / "a" / "b", "--out", "dir")
    check_writable(tmp_path / "r.json", "--json", "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and (tmp_path / "r.json").read_text() == "kept"


def test_an_empty_id_field_is_refused_naming_the_option_and_value(tmp_path):
    from padrec_runtime.api.cli import parse_ids
    out = _one_line_error(_invoke("recommend", "--engines", str(tmp_path / "nowhere"), "--history", "1000,,1001"))
    assert "--history: got '1000,,1001', an empty field" in out and "manifest" not in out
    out = _one_line_error(_invoke("bench", "--engines", ".", "--batch", "1,,2"), code=2)
    assert "got '1,,2', an empty field" in out
    with pytest.raises(InputError, match="an empty field"):
        parse_ids("1,2,")
    assert parse_ids(" 1, 2 ") == [1, 2]


def test_bench_refuses_an_unknown_dataset(engines_master):
    from padrec_export.bench import run_bench
    out = _one_line_error(_invoke("bench", "--engines", str(engines_master), "--dataset", "ml-1k"), code=2)
    assert "'ml-1k' is not one of 'ml-100k', 'ml-9k'" in out
    with pytest.raises(InputError, match="bench dataset: got 'ml-1k' | expected one of ml-100k, ml-9k"):
        run_bench(engines_master, batches=(1,), repeats=1, dataset="ml-1k", progress=False)


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--top-p", "nan")])
def test_recommend_refuses_nan_sampling_options(option, value):
    out = _one_line_error(_invoke("recommend", "--engines", ".", "--history", "1", option, value), code=2)
    assert f"'{option}': got 'nan' | expected a finite number" in out
