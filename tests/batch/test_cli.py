"""python -m inferops [generate] / check: the main job on a tiny model, and a local checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from inferops.__main__ import main
from inferops.batch import generate
from inferops.batch.cli import synthetic_prompts, tiny_model as cli_model

from .models import tiny_model

SMALL = ["--requests", "6", "--system-prompts", "2", "--system-len", "20", "--suffix-len", "4",
         "--max-new-tokens", "3", "--page-size", "4", "--no-progress"]


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_main_job_default_model(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert main([*SMALL, "--compare", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "plan: 2 groups share a prefix" in text
    assert "tokens/s" in text and "prefill tokens:" in text and "decode KV bytes read:" in text
    assert "sharing=False baseline:" in text and "of 6 requests produced identical tokens" in text
    rows = _read(out)
    prompts = synthetic_prompts(6, 2, 20, 4, 512, 0)
    expect = generate(cli_model("cpu", torch.float32, 0), prompts, 3, page_size=4)
    assert [r["tokens"] for r in rows] == expect.tokens
    assert [r["prompt_len"] for r in rows] == [len(p) for p in prompts]
    # the same job as a subcommand
    assert main(["generate", *SMALL, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert [r["tokens"] for r in _read(tmp_path / "b.jsonl")] == expect.tokens


def test_main_job_local_checkpoint_and_prompt_file(tmp_path, capsys):
    model = tiny_model("qwen3", seed=11)
    model.save_pretrained(tmp_path / "ckpt")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, 7, 8, 9, 10, 11, 12, 14], [40, 41]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "gen.jsonl"
    assert main(["--model", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--max-new-tokens", "4", "--page-size", "4", "--no-progress", "--out", str(out)]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    for p, row in zip(prompts, _read(out)):
        hf = model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist()
        assert row["tokens"] == hf


def test_main_job_bad_input_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main([*SMALL, "--max-new-tokens", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "error: expected an int >= 1 for `max_new_tokens`" in capsys.readouterr().err


def test_check_subcommand_is_the_op_table(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--help"])
    assert e.value.code == 0
    assert "python -m inferops check" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the op table's flags still reach it without `check`
        main(["--backend", "reference", "--help"])
    assert "python -m inferops check" in capsys.readouterr().out
