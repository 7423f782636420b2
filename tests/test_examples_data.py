"""posteriordb's reference data are never part of the repository: they are read from the folder that
``$PYRO_NFMALA_POSTERIORDB`` names, and an unset variable or a folder without them fails with an error
that says what to do (the tests that need them skip, saying so)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pyro_nfmala.examples import posteriordb
from pyro_nfmala.examples.posteriordb import (
    ENV_VAR,
    POSTERIORS,
    available,
    data_dir,
    eight_schools_data,
    load_data,
    load_reference,
)

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def test_an_unset_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert ENV_VAR == "PYRO_NFMALA_POSTERIORDB" and not available()
    with pytest.raises(FileNotFoundError, match="PYRO_NFMALA_POSTERIORDB") as error:
        load_data("eight_schools")
    assert "not set" in str(error.value) and "github.com/stan-dev/posteriordb" in str(error.value)


def test_a_folder_without_the_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert data_dir() == tmp_path and not available()
    with pytest.raises(FileNotFoundError, match="PYRO_NFMALA_POSTERIORDB") as error:
        load_data("eight_schools")
    assert str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="PYRO_NFMALA_POSTERIORDB"):
        load_reference("arma")


@pytest.mark.posteriordb
def test_the_variable_names_the_folder_and_the_eight_schools_data_are_posteriordbs(tmp_path, monkeypatch):
    name = "eight_schools"
    filename = f"{POSTERIORS[name][1]}.data.json.zip"
    (tmp_path / filename).write_bytes((data_dir() / filename).read_bytes())
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    data = load_data(name)
    assert data["J"] == 8
    for key, value in eight_schools_data().items():
        assert torch.equal(torch.as_tensor(data[key]), torch.as_tensor(value)), key


def test_no_reference_data_in_the_repository_or_the_package():
    assert not (REPOSITORY_ROOT / "benchmarks" / "data" / "posteriordb").exists()
    assert not (Path(posteriordb.__file__).parent / "data").exists()
    tracked = [path for path in REPOSITORY_ROOT.rglob("*") if path.name.endswith(".draws.json.zip")]
    assert not tracked, tracked
