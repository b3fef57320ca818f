"""The command line explains itself: ``--help`` points to what a newcomer needs, and an output folder
that cannot be used is reported naming ``--out``."""

import pytest

from reweighting.cli import main


def test_reproduce_help_lists_the_studies_and_points_to_list(capsys):
    from reweighting.studies import all_studies

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "reweighting list" in text
    for name in all_studies():
        assert name in text


@pytest.mark.parametrize("out", ["/proc/reweighting-results", "/dev/null/results"])
def test_reproduce_names_out_when_the_folder_cannot_be_made(out, capsys, tmp_path):
    code = main(["reproduce", "tiw-dsm", "--quick", "--out", out, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}" in err and "Traceback" not in err


def test_report_without_results_is_an_error(tmp_path, capsys):
    code = main(["report", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {tmp_path} holds no results" in err
    assert not (tmp_path / "report.md").exists()
