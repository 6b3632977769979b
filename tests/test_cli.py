"""The command line as a user meets it: help, version, one-line errors, Ctrl-C, OpenMP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_circuits.cli import COMMANDS, build_parser, main, source_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparse_circuits.cli", *args], capture_output=True, text=True,
        cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
    )  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and "https://" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- 6: help


HEAVY = ("torch", "zarr", "tokenizers", "safetensors", "matplotlib")
PROBE = """
import sys
from sparse_circuits.cli import main
try:
    main([sys.argv[1], "--help"])
except SystemExit:
    pass
print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:])))
"""


def test_help_imports_no_torch(tmp_path):
    """The first --help of a changed source may import the stage once (and remember its flags);
    a shipped, current cache and every later --help import none of the heavy libraries."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}

    def imported(command: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", PROBE, command, *HEAVY], capture_output=True, text=True,
            env=env, cwd=ROOT, check=True,
        ).stdout.splitlines()[-1]  # fmt: skip

    for command in ("train-clt", "attribute", "quickstart"):
        imported(command)
        # A source file edited in between (a shared working tree) is a new fingerprint: retry.
        assert any(imported(command) == "[]" for _ in range(3)), command


def test_a_stale_help_cache_is_never_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    stale = tmp_path / "sparse-circuits" / "cli_flags.json"
    stale.parent.mkdir()
    bogus = [{"name": "bogus_flag", "kind": "bool", "help": "from an older source"}]
    stale.write_text(json.dumps({"fingerprint": "older", "commands": {"train-toy": bogus}}))
    with pytest.raises(SystemExit):
        main(["train-toy", "--help"])
    out = capsys.readouterr().out
    assert "--bogus-flag" not in out and "--steps" in out
    shipped = json.loads((ROOT / "sparse_circuits" / "cli_flags.json").read_text())
    fresh = {shipped["fingerprint"], json.loads(stale.read_text())["fingerprint"]}
    assert source_fingerprint() in fresh  # the shipped cache is current, or the user's refreshed


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"serve", "worker"}))
def test_every_flag_is_described_with_its_default_or_as_required(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    flags = [a for a in sub._actions if a.dest not in ("help", "config")]
    assert flags
    for action in flags:
        text = (action.help or "").strip()
        assert text and not text.startswith("("), (command, action.option_strings)
        assert "(default: " in text or "(required" in text or "default" in text.lower(), (
            command, action.option_strings,
        )  # fmt: skip


def test_required_flags_say_so_and_defaults_show(capsys):
    with pytest.raises(SystemExit):
        main(["train-toy", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--out OUT Model directory to write. (required, here or in --config)" in out
    assert "--steps STEPS Optimiser steps. (default: 1500)" in out


def test_quickstart_has_one_serve_switch_and_the_cli_a_version(capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    out = capsys.readouterr().out
    assert "--serve, --no-serve" in out and "--no-no-serve" not in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from sparse_circuits import __version__

    assert capsys.readouterr().out.strip() == f"sparse-circuits {__version__}"


# ----------------------------------------------------------------------------- 7: one line


def test_malformed_yaml_config_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\nout: x\n")
    assert main(["train-toy", "--config", str(bad)]) == 2
    assert f"config file {bad} is not valid YAML" in one_line_error(capsys)


def test_broken_json_config_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"out": "x",')
    assert main(["train-toy", "--config", str(bad)]) == 2
    assert f"config file {bad} is not valid JSON" in one_line_error(capsys)


def test_unknown_device_is_a_config_error(tmp_path, capsys):
    assert main(["train-toy", "--out", str(tmp_path / "m"), "--device", "potato"]) == 2
    assert "device: device 'potato' is not one of auto, cpu" in one_line_error(capsys)
    assert not (tmp_path / "m").exists()


def test_model_naming_a_file_says_so(toy_pipeline, tmp_path, capsys):
    config = toy_pipeline.dense / "config.json"
    assert main(["sparsify", "--model", str(config), "--out", str(tmp_path / "s")]) == 2
    assert f"{config} is a file; give the model's directory" in one_line_error(capsys)
    clt_config = toy_pipeline.clt / "config.json"
    args = ["eval-clt", "--clt", str(clt_config), "--model", str(toy_pipeline.sparse)]
    assert main(args) == 2
    assert f"{clt_config} is a file; give the CLT's directory" in one_line_error(capsys)


def test_heads_that_do_not_divide_the_width_is_one_line(tmp_path, capsys):
    args = ["train-toy", "--out", str(tmp_path / "m"), "--d-model", "30", "--n-heads", "4"]
    assert main(args) == 2
    assert "d_model 30 is not a multiple of n_heads 4" in one_line_error(capsys)


def test_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparse_circuits.cli", "train-toy", "--out", str(out),
         "--steps", "100000", "--n-layers", "1", "--d-model", "16", "--n-heads", "2",
         "--log-every", "1", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # a terminal's Ctrl-C: under a shell that started these tests in the background, SIGINT
        # arrives ignored, and Python would not turn it into KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "sparse-circuits train-toy: interrupted; rerun the same command to resume"
    )
    assert not (out / ".lock").exists()  # released on the way out


# ----------------------------------------------------------------------------- 14: OpenMP


def test_cli_sets_a_passive_omp_wait_policy_unless_the_user_chose():
    code = "import os, sparse_circuits.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert got.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert got.stdout.strip() == "ACTIVE"
