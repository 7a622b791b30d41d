"""transfgu.checkpoint: a run's state (objects, values, random generators) saved and restored, read with
weights_only=True only; a state of another key, or one that only a full unpickling reads, is not used."""
import random

import numpy as np
import torch

from transfgu.checkpoint import restart_from_checkpoint, restore_rng, save_on_master
from transfgu.dist import GlobalBatchSampler, epoch_permutation


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_state_round_trip_restores_objects_values_and_random_generators(tmp_path):
    path = tmp_path / "state.pt"
    model, gen = torch.nn.Linear(3, 2), torch.Generator().manual_seed(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    gen_next = torch.rand(2, generator=torch.Generator().set_state(gen.get_state()))
    save_on_master(path, {"key": "k1", "epoch": 3, "history": [{"loss": 1.5}]}, model=model, optimizer=optimizer,
                   gen=gen)
    expected = draws()
    assert set(torch.load(path, weights_only=True)) == {"key", "epoch", "history", "model", "optimizer", "gen", "rng"}

    model2, gen2 = torch.nn.Linear(3, 2), torch.Generator()
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    run = {"epoch": -1, "history": [], "rng": None}
    assert restart_from_checkpoint(path, run, key="k1", model=model2, optimizer=optimizer2, gen=gen2)
    assert run["epoch"] == 3 and run["history"] == [{"loss": 1.5}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert optimizer2.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(2, generator=gen2), gen_next)
    restore_rng(run["rng"])
    assert draws() == expected


def test_another_key_or_no_file_is_not_used(tmp_path):
    path = tmp_path / "state.pt"
    model = torch.nn.Linear(2, 2)
    run = {"epoch": -1}
    assert not restart_from_checkpoint(path, run, model=model)
    save_on_master(path, {"key": "k1", "epoch": 5}, model=torch.nn.Linear(2, 2))
    before = [v.clone() for v in model.state_dict().values()]
    assert not restart_from_checkpoint(path, run, key="k2", model=model)
    assert run == {"epoch": -1} and all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_a_state_that_needs_a_full_unpickling_is_ignored(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"key": "k1", "step": 2, "rng": {"numpy": np.random.get_state()}}, path)  # an older pretrain state
    run = {"step": 0}
    assert not restart_from_checkpoint(path, run, key="k1") and run == {"step": 0}


def test_epoch_permutation_is_the_samplers_order():
    sampler = GlobalBatchSampler(10, 5, seed=3)
    sampler.set_epoch(2)
    assert sum(sampler.global_batches(), []) == epoch_permutation(10, 3, 2).tolist()
    assert epoch_permutation(10, 3, 2).tolist() != epoch_permutation(10, 3, 1).tolist()
