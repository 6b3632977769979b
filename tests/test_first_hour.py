"""Issue 12, "the first hour": what a new user meets in the CLI and the quickstart.

Everything runs on `toy_pipeline` (conftest): every quickstart stage, run for real at a tiny
size, in quickstart's layout. Tests that change files work on copies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sparse_circuits.attribution.inputs import describe_tokens, tokenize_prompt
from sparse_circuits.cli import main
from sparse_circuits.errors import RunDirError, StageError
from sparse_circuits.io import claim_run_dir, read_json, released_locks, run_complete
from sparse_circuits.quickstart import QuickstartConfig, paths, quickstart
from sparse_circuits.sparse_attention.modeldir import load_tokenizer, read_model_config


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def attribute_args(p, out: Path, prompt: str = "12+34=", model: Path | None = None) -> list[str]:
    return [
        "attribute", "--model", str(model or p.sparse), "--clt", str(p.clt), "--prompt", prompt,
        "--out", str(out), "--max-feature-nodes", "8", "--qk-edges", "0", "--device", "cpu",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- 1-3: data safety


def test_attribute_never_overwrites_a_file_it_did_not_write(toy_pipeline, tmp_path, capsys):
    model = shutil.copytree(toy_pipeline.sparse, tmp_path / "model")
    before = (model / "config.json").read_bytes()
    assert main(attribute_args(toy_pipeline, model / "config.json", model=model)) == 2
    assert (model / "config.json").read_bytes() == before
    assert "was not written by this stage" in one_line_error(capsys)


def test_attribute_out_naming_a_directory_is_refused_in_one_line(toy_pipeline, tmp_path, capsys):
    assert main(attribute_args(toy_pipeline, tmp_path)) == 2
    assert "is a directory" in one_line_error(capsys)


def test_attribute_replaces_a_graph_only_when_asked(toy_pipeline, tmp_path, capsys):
    graph = tmp_path / "graph.json"
    shutil.copy(toy_pipeline.graphs[0], graph)
    before = graph.read_bytes()
    assert main(attribute_args(toy_pipeline, graph)) == 2
    assert graph.read_bytes() == before
    assert "--overwrite" in one_line_error(capsys)
    assert main([*attribute_args(toy_pipeline, graph), "--overwrite"]) == 0
    assert json.loads(graph.read_text())["metadata"]["prompt"] == "12+34="


def test_attribute_store_dir_never_replaces_a_folder_it_did_not_write(
    toy_pipeline, tmp_path, capsys
):
    model = shutil.copytree(toy_pipeline.sparse, tmp_path / "model")
    listing = sorted(str(p) for p in model.rglob("*"))
    args = [a for a in attribute_args(toy_pipeline, tmp_path / "unused") if a != "--out"]
    args = [a for a in args if a != str(tmp_path / "unused")]
    assert main([*args, "--store-dir", str(model)]) == 2
    assert "holds files this stage did not write" in one_line_error(capsys)
    assert sorted(str(p) for p in model.rglob("*")) == listing
    store = tmp_path / "store"
    assert main([*args, "--store-dir", str(store)]) == 0
    assert main([*args, "--store-dir", str(store)]) == 0  # the same run again (a job's retry)
    capsys.readouterr()
    assert main([*args, "--store-dir", str(store), "--max-n-logits", "3"]) == 2
    assert "--overwrite" in one_line_error(capsys)


def test_quickstart_refuses_a_data_dir_that_is_not_its_own(toy_pipeline, tmp_path, capsys):
    model = shutil.copytree(toy_pipeline.dense, tmp_path / "model")
    listing = sorted(str(p) for p in model.rglob("*"))
    with pytest.raises(RunDirError, match="something other than a quickstart"):
        quickstart(QuickstartConfig(data_dir=model, serve=False))
    assert main(["quickstart", "--data-dir", str(model), "--no-serve"]) == 2
    assert "config.json" in one_line_error(capsys)
    assert sorted(str(p) for p in model.rglob("*")) == listing


def test_a_run_that_failed_on_its_input_does_not_block_the_corrected_rerun(toy_pipeline, tmp_path):
    out = tmp_path / "sparse"
    args = ["sparsify", "--out", str(out), "--steps", "2", "--batch-size", "16"]
    args += ["--warmup-steps", "1", "--eval-sequences", "16", "--select-sequences", "0"]
    assert main([*args, "--model", str(tmp_path / "no-such-model")]) == 2
    assert main([*args, "--model", str(toy_pipeline.dense)]) == 0
    assert run_complete(out)


def test_a_run_that_produced_files_is_still_refused(tmp_path):
    out = tmp_path / "run"
    with released_locks():
        claim_run_dir(out, "train-toy", {"steps": 1})
        (out / "metrics.jsonl").write_text('{"step": 0}\n')
    with released_locks(), pytest.raises(RunDirError, match="holds another run"):
        claim_run_dir(out, "train-toy", {"steps": 2})
    assert read_json(out / "run.json")["config"] == {"steps": 1}


# ----------------------------------------------------------------------------- 4: prompts


def test_text_prompts_get_the_models_bos_and_unknown_characters_are_named(toy_pipeline):
    tok = load_tokenizer(toy_pipeline.sparse)
    bos = read_model_config(toy_pipeline.sparse).bos_token_id
    with_bos = tok.encode("<bos>58+25=").ids
    assert tokenize_prompt("58+25=", tok, bos_token_id=bos).tolist() == with_bos
    assert tokenize_prompt("<bos>58+25=", tok, bos_token_id=bos).tolist() == with_bos
    assert tokenize_prompt("58+25=", tok).tolist() == with_bos[1:]
    with pytest.raises(StageError, match=r"'\*', 'x'"):
        tokenize_prompt("<bos>3x*4=", tok, bos_token_id=bos)
    ids = tokenize_prompt("58+25=", tok, bos_token_id=bos)
    assert describe_tokens(ids, tok) == "7 tokens: <bos> | 5 | 8 | + | 2 | 5 | ="


def test_attribute_adds_bos_unless_no_bos(toy_pipeline, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(attribute_args(toy_pipeline, tmp_path / "a.json")) == 0
    assert main([*attribute_args(toy_pipeline, tmp_path / "b.json"), "--no-bos"]) == 0
    a = json.loads((tmp_path / "a.json").read_text())["metadata"]["prompt_tokens"]
    b = json.loads((tmp_path / "b.json").read_text())["metadata"]["prompt_tokens"]
    assert a == ["<bos>", "1", "2", "+", "3", "4", "="]
    assert b == a[1:]
    assert "prompt: 7 tokens: <bos> | 1 | 2 | + | 3 | 4 | =" in caplog.messages


# ----------------------------------------------------------------------------- 5: quickstart


def test_quickstart_rerun_skips_finished_stages_and_sums_up(toy_pipeline, tmp_path, caplog):
    root = shutil.copytree(toy_pipeline.root, tmp_path / "data")
    p = paths(root)
    p.graphs[1].unlink()  # one stage left to do: quickstart must ask each stage, not guess
    caplog.set_level(logging.INFO)
    quickstart(QuickstartConfig(data_dir=root, serve=False))
    msgs = caplog.messages
    for k in range(1, 6):
        assert any(
            m.startswith(f"stage {k}/6: ") and m.endswith("already done, skipping") for m in msgs
        )
    assert any(m.startswith("stage 6/6: attribute") and "CPU cores)" in m for m in msgs)
    assert json.loads(p.graphs[1].read_text())["metadata"]["prompt"] == "58+67="
    text = "\n".join(msgs)
    for path in (*p.graphs, p.sparse / "attention_patterns.png", p.clt):
        assert str(path) in text
    assert "sparse-circuits attribute --model" in text and "BOS is added for you" in text
    assert (root / "quickstart.json").is_file()


def test_quickstart_serve_flag_and_its_older_spelling():
    assert QuickstartConfig().serve is True
    assert QuickstartConfig(no_serve=True).serve is False
    assert QuickstartConfig.model_validate({"no_serve": False}).serve is True


# ----------------------------------------------------------------------------- 8-13: results


def test_sparsify_names_each_tau(toy_pipeline, tmp_path, caplog):
    from sparse_circuits.sparse_attention.sparsify import SparsifyConfig, sparsify

    caplog.set_level(logging.INFO)
    with released_locks():
        sparsify(SparsifyConfig(
            model=toy_pipeline.dense, out=tmp_path / "s", steps=4, batch_size=16, warmup_steps=1,
            eval_sequences=16, select_sequences=16, select_every=1, gate_offset_anneal=0.25,
            lambda_init=1e-3, device="cpu",
        ))  # fmt: skip
    with_tau = [m for m in caplog.messages if "τ" in m]
    assert len(with_tau) >= 3  # held-out, validation, and the closing line
    for m in with_tau:
        assert m.count("τ") == 1, m
        assert "τ_held-out" in m or "τ_validation" in m, m


def test_a_clt_trained_as_batchtopk_says_so(toy_pipeline):
    info = read_json(toy_pipeline.clt / "config.json")
    assert info["clt"]["activation"] == "jumprelu"  # as saved: circuit-tracer's layout
    assert info["trained_as"] == "batchtopk"


def test_feature_stats_give_text_without_a_tokenizer_argument(toy_pipeline, tmp_path):
    from sparse_circuits.clt import read_feature
    from sparse_circuits.clt.features import FeatureStatsConfig, feature_stats

    clt = shutil.copytree(toy_pipeline.clt, tmp_path / "clt")
    feature_stats(FeatureStatsConfig(clt=clt, model=toy_pipeline.sparse, split="heldout",
                                     sequences=32, device="cpu"))  # fmt: skip
    tok = load_tokenizer(toy_pipeline.sparse)
    fired = [read_feature(clt, 0, f) for f in range(32)]
    contexts = [c for feat in fired for c in feat["top_contexts"]]
    assert contexts
    for c in contexts:
        assert c["strings"] == [tok.decode([t]) for t in c["tokens"]]
    assert all("token" in entry for entry in fired[0]["top_logits"])


def test_export_names_the_model_the_same_from_any_directory(toy_pipeline, tmp_path, monkeypatch):
    from sparse_circuits.clt.export import ExportConfig, export
    from sparse_circuits.clt.harvest import HarvestConfig, harvest

    monkeypatch.chdir(toy_pipeline.root)  # a model given relative to where the command runs
    with released_locks():
        harvest(HarvestConfig(model=Path("models/addition-sparse"), out=str(tmp_path / "a.zarr"),
                              tokens=256, device="cpu"))  # fmt: skip
    import zarr

    attrs = zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs
    assert attrs["model"] == str(toy_pipeline.sparse.resolve())
    monkeypatch.chdir(tmp_path)
    export(ExportConfig(clt=toy_pipeline.clt, out=tmp_path / "export"))
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    assert config["model_name"] == str(toy_pipeline.sparse.resolve())
    assert (
        config["model_sha256"]
        == read_json(toy_pipeline.clt / "config.json")["activations"]["attrs"]["model_sha256"]
    )


def test_artifacts_honour_the_umask(toy_pipeline, tmp_path):
    from sparse_circuits.clt.export import ExportConfig, export
    from sparse_circuits.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        export(ExportConfig(clt=toy_pipeline.clt, out=tmp_path / "export"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "export").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_train_clt_checkpoints_by_time_as_well_as_by_steps(toy_pipeline, tmp_path):
    from sparse_circuits.clt.train import TrainCLTConfig, train_clt

    out = tmp_path / "clt"
    with released_locks():
        train_clt(TrainCLTConfig(
            activations=str(toy_pipeline.acts), out=out, d_features=16, batch_size=64, steps=4,
            lr_warmup_steps=1, activation="batchtopk", k=2, checkpoint_every=1000,
            checkpoint_minutes=1e-9, device="cpu",
        ))  # fmt: skip
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000003", "step_00000004"]  # every step was due; the last two kept
