import pathlib
import runpy

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"


def test_smollm2_workflow_example_runs_on_the_tiny_model(capsys):
    main = runpy.run_path(str(EXAMPLES / "qprobe_smollm2.py"))["main"]
    assert main(["--tiny", "--questions", "6", "--k", "4", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 questions x 4 completions" in out and "mse probe (argmax): k=1:" in out and "pass@k" in out
