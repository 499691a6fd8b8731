"""`crystalfm data build|inspect` through the one console script (inline executor: no Ray here)."""
from __future__ import annotations

import pytest

from crystalfm.cli import main as crystalfm_main
from data_pipeline.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        crystalfm_main(["data", "build", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--source KIND:PATH[:NAME]" in out and "--ray-address" in out and "resumes" in out


def test_build_from_flags_then_rerun_reports_existing(shared_data, tmp_path, capsys):
    source = f"mptrj:{shared_data / 'derived_layouts' / 'mptrj' / 'bad' / 'force_shape.json'}:bad"
    args = ["data", "build", "--source", source, "--out", str(tmp_path / "out"), "--inline", "--no-progress",
            "--splits", "train=0.5,val=0.25,test=0.25", "--shard-bytes", "64KB", "--seed", "7"]
    assert crystalfm_main(args) == 0
    out = capsys.readouterr().out
    assert "crystalfm data build: 1 source(s) [bad (mptrj)]" in out and "seed: 7" not in out  # quiet: no config
    assert len(out.splitlines()) == 2, out  # what it does, then the summary
    assert "records in 18 = written 17 + rejects 1 + duplicates 0 + excluded 0" in out
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert '"reason": "label_shape: forces shape' in rejects and "force_shape.json" in rejects

    assert crystalfm_main(args + ["--verbose"]) == 0
    out = capsys.readouterr().out
    assert "crystalfm data build, config:" in out and "seed: 7" in out and "shard_bytes: 65536" in out
    assert "already holds a finished build of this config" in out
    assert crystalfm_main(args[:-1] + ["8"]) == 2
    assert "different config" in capsys.readouterr().err


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("sources: [mptrj:x.json]\nshard_size: 5\n")
    assert main(["build", str(config), "--inline"]) == 2
    err = capsys.readouterr().err
    assert "c.yaml: unknown config key 'shard_size'; did you mean 'shard_bytes'?" in err
    assert main(["build", "--source", "nonsense", "--inline"]) == 2
    assert "expected KIND:PATH[:NAME]" in capsys.readouterr().err
    assert main(["build", "--source", "no_such_kind:x", "--inline", "--out", str(tmp_path / "o")]) == 2
    assert "unknown kind 'no_such_kind'" in capsys.readouterr().err


def test_sample_build_or_a_clear_message(tmp_path, capsys):
    try:
        from data_pipeline.sample import sample_sources

        sample_sources()
    except (ImportError, FileNotFoundError):
        assert main(["build", "--sample", "--inline", "--out", str(tmp_path / "demo")]) == 2
        assert "embedded demo sample is" in capsys.readouterr().err
        return
    assert main(["build", "--sample", "--inline", "--no-progress", "--out", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "manifest.json").exists()


@pytest.mark.parametrize("source", ["bogus:some/dir", "cdvae_csv:no/such/file.csv"])
def test_bad_source_fails_before_ray_and_leaves_nothing(source, tmp_path, capsys):
    from data_pipeline.cli import main as data_main

    assert data_main(["build", "--source", source, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert source.split(":")[0] in err and ("unknown kind" in err or "does not exist" in err)
    assert not (tmp_path / "out").exists()


def _failing_dedup(*args, **kwargs):
    raise RuntimeError("forced failure after the parse stage")


@pytest.mark.slow
def test_failed_build_removes_what_it_created_unless_keep_failed(shared_data, tmp_path, monkeypatch, capsys):
    """A build that fails after Ray started and chunks were parsed leaves no OUT/_work/ nor OUT;
    --keep-failed keeps _work/, and a rerun resumes from it (#17)."""
    from data_pipeline.build import stages

    source = f"mptrj:{shared_data / 'derived_layouts' / 'mptrj' / 'bad' / 'force_shape.json'}:bad"
    out = tmp_path / "out"
    args = ["build", "--source", source, "--out", str(out), "--no-progress", "--splits", "train=0.5,val=0.5"]
    monkeypatch.setattr(stages, "dedup_stage", _failing_dedup)
    with pytest.raises(RuntimeError, match="forced failure"):
        main(args + ["--num-workers", "1"])  # real in-process Ray
    assert not out.exists()
    assert "removed what it had created" in capsys.readouterr().out

    out.mkdir()  # an OUT the user made is kept, emptied of what the build added
    with pytest.raises(RuntimeError, match="forced failure"):
        main(args + ["--inline"])
    assert out.is_dir() and not any(out.iterdir())

    with pytest.raises(RuntimeError, match="forced failure"):
        main(args + ["--inline", "--keep-failed"])
    assert any((out / "_work" / "chunks").iterdir())
    assert "kept" in capsys.readouterr().out

    monkeypatch.undo()
    assert main(args + ["--inline"]) == 0
    printed = capsys.readouterr().out
    assert "resuming the unfinished build" in printed and (out / "manifest.json").exists()
    assert not (out / "_work").exists()
