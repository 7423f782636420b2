"""posteriordb's reference data live in the repository (benchmarks/data/posteriordb), not in the
package: the checkout finds them by default, and a folder without them fails with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyro_nfmala.examples import posteriordb
from pyro_nfmala.examples.posteriordb import ENV_VAR, POSTERIORS, data_dir, load_data, load_reference

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def test_missing_data_folder_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_NFMALA_POSTERIORDB", str(tmp_path))
    assert ENV_VAR == "PYRO_NFMALA_POSTERIORDB" and data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="PYRO_NFMALA_POSTERIORDB") as error:
        load_data("eight_schools")
    assert "source repository" in str(error.value) and "wheel" in str(error.value)
    with pytest.raises(FileNotFoundError, match="PYRO_NFMALA_POSTERIORDB"):
        load_reference("arma")


def test_the_variable_names_another_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRO_NFMALA_POSTERIORDB", raising=False)
    name = "eight_schools"
    filename = f"{POSTERIORS[name][1]}.data.json.zip"
    (tmp_path / filename).write_bytes((data_dir() / filename).read_bytes())
    monkeypatch.setenv("PYRO_NFMALA_POSTERIORDB", str(tmp_path))
    assert load_data(name)["J"] == 8


def test_default_data_folder_is_the_checkouts(monkeypatch):
    monkeypatch.delenv("PYRO_NFMALA_POSTERIORDB", raising=False)
    folder = data_dir()
    assert folder == REPOSITORY_ROOT / "benchmarks" / "data" / "posteriordb"
    assert folder.is_dir() and posteriordb.DATA == folder
    for posterior, data_name in POSTERIORS.values():
        assert (folder / f"{data_name}.data.json.zip").is_file()
        assert (folder / f"{posterior}.draws.json.zip").is_file()
    assert (folder / "LICENCE.md").is_file()
    # nothing left in the package that a wheel would carry
    assert not (Path(posteriordb.__file__).parent / "data").exists()
