"""Small fixes of session 32 (from the third fuzz round's notes).

- ``orthofx transform ... --json -`` wrote a file literally named ``-`` in the working directory (the Unix
  convention reads it as standard output, where the report table goes): now a one-line error before the transform.
- ``Policy.load("lorth")`` with a file named ``lorth`` in the working directory used the preset without a word:
  now an ``OrthofxWarning`` that says which one is used and how to name the file.
"""

from __future__ import annotations

import pytest

import orthofx
from orthofx.cli import main
from orthofx.errors import OrthofxWarning


@pytest.mark.parametrize("option", ["--json", "--plot", "--export"])
def test_dash_as_an_output_path_is_refused_before_anything_is_written(capsys, tmp_path, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    code = main(["transform", "small_cnn", "--policy", "lorth", option, "-"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert f"{option} -: writing to standard output is not supported" in err and "give a file path" in err
    assert not out and list(tmp_path.iterdir()) == []  # no file named '-', no transform output


def test_a_file_named_like_a_preset_is_named_in_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    svd_text = orthofx.Policy.load("svd").to_yaml()
    (tmp_path / "lorth").write_text(svd_text)
    with pytest.warns(OrthofxWarning, match="'lorth' names both a preset and a file.*'./lorth'"):
        policy = orthofx.Policy.load("lorth")
    assert policy == orthofx.Policy.load(orthofx.Policy.preset("lorth"))  # the preset
    from_file = orthofx.Policy.load("./lorth")  # the file, as the warning says
    assert [rule.apply for rule in from_file.rules] == [rule.apply for rule in orthofx.Policy.load("svd").rules]
