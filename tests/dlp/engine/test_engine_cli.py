"""`dlp generate` end to end on the embedded default, and its one-line errors."""

from __future__ import annotations

import json

from engine_helpers import write_adapters

from dlp.cli import main


def test_generate_with_a_mix_prints_json(default_model, tmp_path, capsys):
    write_adapters(default_model, tmp_path, ["alpha", "beta"], b_std=0.05)
    code = main(
        [
            "generate",
            "The capital of France is",
            "--adapters",
            "alpha=3,beta=1",
            "--adapter-root",
            str(tmp_path),
            "--max-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mix"] == {"alpha": 0.75, "beta": 0.25}
    assert out["completion_tokens"] <= 5 and out["text"]
    assert out["finish_reason"] in ("length", "stop")


def test_generate_streams_text(capsys):
    assert main(["generate", "Say hello.", "--chat", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["generate", "x", "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "max_tokens" in err and "\n" not in err
    assert main(["generate", "x", "--adapters", "a=heavy"]) == 2
    assert "--adapters" in capsys.readouterr().err
    assert (
        main(["generate", "x", "--adapters", "a=1", "--adapter-root", str(tmp_path / "none")]) == 2
    )
    assert "--adapter-root" in capsys.readouterr().err
    assert main(["generate", "x", "--adapters", "nope=1", "--adapter-root", str(tmp_path)]) == 2
    assert "unknown adapter" in capsys.readouterr().err
    assert main(["bench", "fusion", "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
