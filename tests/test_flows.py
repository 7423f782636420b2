"""Building, saving and loading flows: round trips, and files that cannot run code or be lost."""

import os
import pickle
import time

import pytest
import torch
import zuko

from pyro_nfmala import default_flow, identity_flow, load_flow, save_flow
from pyro_nfmala.flows.files import FORMAT
from pyro_nfmala.flows.staged import StagedFlow


def same_map(a, b, dim, dtype=torch.float32):
    z = torch.randn(16, dim, dtype=dtype)
    with torch.no_grad():
        return torch.equal(a().transform.inv(z), b().transform.inv(z))


@pytest.mark.parametrize(
    "build, spec",
    [
        (lambda: default_flow(3), None),
        (lambda: default_flow(3, kind="affine", transforms=2), None),
        (lambda: identity_flow(2), None),
        (lambda: zuko.flows.NSF(2, transforms=2), {"name": "NSF", "args": [2], "kwargs": {"transforms": 2}}),
        (lambda: zuko.flows.MAF(2), {"name": "zuko.flows.MAF", "args": [2]}),
        (lambda: zuko.flows.NSF(3, transforms=2, hidden_features=(16, 8), bins=5), None),
        (lambda: zuko.flows.MAF(4, passes=2, randperm=True), None),
        (lambda: zuko.flows.RealNVP(5, transforms=2, randmask=True), None),
        (lambda: zuko.flows.NICE(3).double(), None),
        (lambda: StagedFlow(torch.ones(2), 2 * torch.eye(2), zuko.flows.NSF(2, transforms=1)), None),
    ],
    ids=[
        "default_spline",
        "default_affine",
        "identity",
        "NSF_with_spec",
        "MAF_with_spec",
        "NSF_read",
        "MAF_randperm_read",
        "RealNVP_randmask_read",
        "NICE_float64_read",
        "staged_NSF_read",
    ],
)
def test_round_trip(tmp_path, build, spec):
    flow = build()
    with torch.no_grad():  # weights other than a fresh flow's
        for p in flow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "flow.pt"
    save_flow(flow, path, spec=spec, losses=[1.0, 0.5], note="x")
    loaded, metadata = load_flow(path, with_metadata=True)
    dim = next(iter(flow().base.sample().shape))
    dtype = next(flow.parameters()).dtype
    assert same_map(loaded, flow, dim, dtype)
    assert metadata == {"losses": [1.0, 0.5], "note": "x"}
    assert not loaded.training


def test_float64_round_trip_and_loading_leaves_the_global_rng_alone(tmp_path):
    flow = default_flow(2).double()
    save_flow(flow, tmp_path / "f.pt")
    state = torch.get_rng_state()
    loaded = load_flow(tmp_path / "f.pt")
    assert torch.equal(torch.get_rng_state(), state)
    assert next(loaded.parameters()).dtype == torch.float64
    assert same_map(loaded, flow, 2, torch.float64)


class Payload:
    """What a hostile file would carry: unpickling it runs ``open(marker, "w")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["pyro_nfmala.flow/1", "pyro_nfmala.flow/2", FORMAT])
def test_a_file_with_pickled_code_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pt"
    torch.save({"format": fmt, "flow": Payload(marker), "metadata": {}}, path)
    with pytest.raises(ValueError, match=str(path)):
        load_flow(path)
    assert not marker.exists()


def test_a_damaged_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "flow.pt"
    save_flow(default_flow(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="flow.pt"):
        load_flow(path)
    other = tmp_path / "other.pt"
    torch.save({"something": 1}, other)
    with pytest.raises(ValueError, match="not written by pyro_nfmala.save_flow"):
        load_flow(other)


def test_a_failed_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "flow.pt"
    save_flow(default_flow(2), path)
    before = path.read_bytes()

    def failing_save(obj, file):  # writes part of the file, then the disk is full
        file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_flow(default_flow(2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["flow.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert same_map(load_flow(path), load_flow(path), 2)


def test_what_cannot_be_saved_is_refused_before_writing(tmp_path):
    path = tmp_path / "flow.pt"
    with pytest.raises(ValueError, match="could not read how to rebuild this MAF"):
        save_flow(zuko.flows.MAF(2, activation=torch.nn.ELU), path)  # a callable: not in a file
    with pytest.raises(ValueError, match="unknown flow builder 'os.system'"):
        save_flow(zuko.flows.NSF(2), path, spec={"name": "os.system", "args": ["true"]})
    with pytest.raises(TypeError, match=r"metadata\['model'\] is a function"):
        save_flow(default_flow(2), path, model=same_map)
    with pytest.raises(TypeError, match="zuko flow module"):
        save_flow(default_flow(2)(), path)
    assert not path.exists()


def test_flows_still_pickle(tmp_path):
    flow = default_flow(2)
    clone = pickle.loads(pickle.dumps(flow))
    assert same_map(clone, flow, 2)


def test_a_file_that_cannot_be_read_gives_the_systems_error_not_a_damaged_file(tmp_path, monkeypatch):
    """Without read permission (simulated: root reads anything) or given a folder, the error is the file
    system's, not "not a flow file, or damaged"."""
    path = tmp_path / "flow.pt"
    save_flow(default_flow(2), path)

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(IsADirectoryError):
        load_flow(tmp_path)
    monkeypatch.setattr(torch, "load", unreadable)
    with pytest.raises(PermissionError, match="Permission denied"):
        load_flow(path)


@pytest.mark.parametrize("trick", ["huge_spec", "broadcast_weights"])
def test_a_crafted_spec_cannot_make_load_flow_build_a_huge_flow(tmp_path, trick):
    """A small file whose spec asks for a huge flow (the hostile pass: 40 KiB, 885 MiB and 4.8 s before
    refusing) is refused while building, within the weights the file really stores; a broadcast view
    that claims many elements over one stored value does not raise the bound."""
    flow = zuko.flows.NSF(2, transforms=1, hidden_features=(8,))
    state = flow.state_dict()
    if trick == "broadcast_weights":
        state = dict(state, padding=torch.zeros(1).expand(10**9))
    path = tmp_path / "crafted.pt"
    spec = {"name": "NSF", "args": [2], "kwargs": {"transforms": 50, "hidden_features": [4096] * 8}}
    torch.save(
        {"format": FORMAT, "spec": spec, "dtype": "float32", "state_dict": state, "metadata": {}}, path
    )
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="refused before building it"):
        load_flow(path)
    assert time.perf_counter() - start < 2.0  # not a timing claim: a full build takes far longer
