"""Every tutorial runs end to end in smoke mode and writes its figures."""

import os
import subprocess
import sys

from pathlib import Path

import pytest

pytestmark = pytest.mark.tutorials

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))
#: Tutorials that score their runs against posteriordb's reference draws ($PYRO_NFMALA_POSTERIORDB).
NEED_POSTERIORDB = {"02_eight_schools"}


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(path, marks=pytest.mark.posteriordb) if path.stem in NEED_POSTERIORDB else path
        for path in TUTORIALS
    ],
    ids=[path.stem for path in TUTORIALS],
)
def test_tutorial_runs_in_smoke_mode(script):
    env = {**os.environ, "SMOKE_TEST": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = list((script.parent / "figures").glob(f"{script.stem[:2]}_*_smoke.png"))
    assert figures, "the tutorial saved no figure"
