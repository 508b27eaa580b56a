import json
import subprocess
import sys

import pytest

from deltaserve_zoo.matrix import AccuracyMatrix


def _cli_in_process(capsys, *args) -> tuple[int, str]:
    """``deltaserve ARGS`` in this process (for refusals, which load nothing): exit status and what a user
    sees on stderr (argparse's message, or the SystemExit message Python prints at exit)."""
    from deltaserve.server.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if isinstance(code, str):
        return 1, err + code
    return code or 0, err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "deltaserve.server.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_eval_cli_matches_the_zoo_matrix(micro_zoo, tmp_path):
    layout, spec = micro_zoo.layout, micro_zoo.spec
    out = tmp_path / "eval.json"
    tasks = list(spec.tasks[:2])
    res = _cli("eval", "--model", str(layout.base), "--adapter", str(layout.lora(tasks[0])),
               "--tasks", *tasks, "--n", str(spec.eval_examples), "--json", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    matrix = AccuracyMatrix.load(layout.matrix / "llm.json")
    assert result["accuracy"] == {t: matrix.rows[f"lora:{tasks[0]}"][t] for t in tasks}
    assert tasks[0] in res.stdout  # the printed table


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "/nonexistent"], "is not a directory"),
        (["eval", "--model", "."], "has no config.json"),
        (["eval", "--model", "{base}", "--tasks", "nope"], "unknown task"),
        (["eval", "--model", "{base}", "--adapter", "{base}"], "has no adapter_config.json"),
        (["eval", "--model", "{base}", "--n", "0"], "--n must be >= 1"),
        (["zoo", "build", "--size", "huge"], "unknown zoo size 'huge'"),
        (["compress", "--base", "{base}", "--finetuned", "{base}", "--method", "magnitude", "--rank", "4",
          "--out", "/tmp/x"], "--rank does not apply to compression method 'magnitude' (it takes --density, --values)"),
        (["merge", "--base", "{base}", "--experts", "{base}", "--method", "ties", "--density", "2",
          "--out", "/tmp/x"], "--density: invalid options for merge method 'ties'"),
    ],
)
def test_bad_arguments_give_a_clear_error(micro_zoo, args, message, capsys):
    args = [a.format(base=micro_zoo.layout.base) for a in args]
    code, err = _cli_in_process(capsys, *args)
    assert code != 0
    assert message in err
    assert "Traceback" not in err


def test_compress_then_inspect(micro_zoo, tmp_path):
    layout = micro_zoo.layout
    out = tmp_path / "upper-tswitch"
    res = _cli("compress", "--base", str(layout.base), "--finetuned", str(layout.full("upper")),
               "--method", "tswitch", "--density", "0.05", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").is_file()
    res = _cli("inspect", str(out), "--verify")
    assert res.returncode == 0, res.stderr
    assert "ternary" in res.stdout and "bits/param" in res.stdout and "upper-tswitch" in res.stdout


def test_inspect_and_compress_refuse_bad_inputs(micro_zoo, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    code, err = _cli_in_process(capsys, "inspect", str(broken))
    assert code != 0 and "Traceback" not in err and "manifest" in err
    base, full = str(micro_zoo.layout.base), str(micro_zoo.layout.full("upper"))
    code, err = _cli_in_process(capsys, "compress", "--base", base, "--finetuned", full, "--method", "nps",
                                "--out", str(tmp_path / "x"))
    assert code != 0 and "needs --calibration" in err
    code, err = _cli_in_process(capsys, "compress", "--base", base, "--finetuned", full, "--density", "1.5",
                                "--out", str(tmp_path / "x"))
    assert code != 0 and "--density" in err
    code, err = _cli_in_process(capsys, "compress", "--base", base, "--finetuned", full, "--max-weight", "0.5",
                                "--out", str(tmp_path / "x"))
    assert code != 0 and "max_weight" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_compress_nps_per_tensor_records_its_search(micro_zoo, tmp_path):
    calib = tmp_path / "calib.jsonl"
    res = _cli("zoo", "data", "--task", "upper", "--split", "calib", "--n", "8", "--out", str(calib))
    assert res.returncode == 0, res.stderr
    assert len(calib.read_text().splitlines()) == 8
    out = tmp_path / "upper-nps"
    res = _cli("compress", "--base", str(micro_zoo.layout.base), "--finetuned", str(micro_zoo.layout.full("upper")),
               "--method", "nps", "--calibration", str(calib), "--task", "upper", "--generations", "2",
               "--population", "4", "--banding", "per-tensor", "--max-weight", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    method = manifest["method"]
    assert method["banding"] == "per-tensor" and method["max_weight"] == 2 and method["population"] == 4
    assert method["objective"] == "teacher_forced_exact_match" and manifest["task"] == "upper"
    assert 1 <= len(method["history"]) <= 2 and all(0 <= w <= 2 for w in method["weights"])  # pycma may stop early


def test_merge_writes_a_loadable_checkpoint_equal_to_the_math(micro_zoo, tmp_path):
    import torch

    from deltaserve.experts.taskvector import load_state_dict
    from deltaserve_zoo.build import load_llama

    layout = micro_zoo.layout
    experts = []
    for task in ("upper", "length"):
        out = tmp_path / task
        res = _cli("compress", "--base", str(layout.base), "--finetuned", str(layout.full(task)),
                   "--method", "dense", "--out", str(out))
        assert res.returncode == 0, res.stderr
        experts.append(out)
    merged = tmp_path / "merged"
    res = _cli("merge", "--base", str(layout.base), "--experts", *map(str, experts), "--method", "ta",
               "--weights", "0.7", "0.3", "--out", str(merged))
    assert res.returncode == 0, res.stderr
    model = load_llama(merged)  # loadable by transformers
    base, up, ln = (load_state_dict(p) for p in (layout.base, layout.full("upper"), layout.full("length")))
    got = model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base[name] + 0.7 * (up[name] - base[name]) + 0.3 * (ln[name] - base[name])
    torch.testing.assert_close(got[name], expected, rtol=1e-3, atol=1e-4)  # fp16-stored deltas
    assert not torch.equal(got[name], base[name])
    res = _cli("merge", "--base", str(layout.base), "--experts", str(experts[0]), "--weights", "1", "2",
               "--out", str(tmp_path / "bad"))
    assert res.returncode != 0 and "--weights" in res.stderr


def test_compress_sparse_ft_retrains_the_kept_entries(micro_zoo, tmp_path):
    base, tuned = str(micro_zoo.layout.base), str(micro_zoo.layout.full("length"))
    res = _cli("compress", "--base", base, "--finetuned", tuned, "--method", "sparse_ft", "--out", str(tmp_path / "x"))
    assert res.returncode != 0 and "needs --training" in res.stderr and "Traceback" not in res.stderr
    train = tmp_path / "train.jsonl"
    assert _cli("zoo", "data", "--task", "length", "--split", "train", "--n", "64", "--out", str(train)).returncode == 0
    res = _cli("compress", "--base", base, "--finetuned", tuned, "--method", "sparse_ft", "--training", str(train),
               "--lr", "-1", "--out", str(tmp_path / "x"))
    assert res.returncode != 0 and "--lr" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "length-sft"
    res = _cli("compress", "--base", base, "--finetuned", tuned, "--method", "sparse_ft", "--training", str(train),
               "--density", "0.05", "--steps", "5", "--batch-size", "8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"] == "sparse_ef" and manifest["method"]["name"] == "sparse_ft"
    assert manifest["method"]["steps"] == 5 and 0 < manifest["density"] <= 0.051
