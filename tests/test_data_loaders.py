"""TrainLoader / ValLoader: orders, wrap-around, DDP sharding and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import DataError, TrainLoader, ValLoader


def ramp(n: int) -> np.ndarray:
    # Token value == position, so every batch shows exactly where it was read from.
    return np.arange(n, dtype=np.uint16)


def take(loader: TrainLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def assert_plain(value: object) -> None:
    """A checkpoint must be able to hold the state without tensors or arrays."""
    assert json.loads(json.dumps(value)) == value
    if isinstance(value, dict):
        for v in value.values():
            assert isinstance(v, int | str | bool), v


def test_sequential_reads_consecutive_non_overlapping_chunks() -> None:
    loader = TrainLoader(ramp(1000), batch_size=2, block_size=4)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert x.shape == y.shape == (2, 4)
    assert x.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert y.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    x2, _ = loader.next_batch()
    assert x2.tolist() == [[10, 11, 12, 13], [15, 16, 17, 18]]


def test_sequential_wraps_when_the_next_chunk_would_run_past_the_end() -> None:
    # 25 tokens hold two chunks of 2 x 5 plus a 5-token tail that is never used.
    loader = TrainLoader(ramp(25), batch_size=2, block_size=4)
    starts = [int(loader.next_batch()[0][0, 0]) for _ in range(5)]
    assert starts == [0, 10, 0, 10, 0]


def test_sequential_uses_the_last_token_when_chunks_fit_exactly() -> None:
    loader = TrainLoader(ramp(20), batch_size=2, block_size=4)
    _, y = take(loader, 2)[1]
    assert int(y[-1, -1]) == 19
    assert int(loader.next_batch()[0][0, 0]) == 0


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_ddp_ranks_together_see_the_single_process_batch(order: str) -> None:
    tokens = ramp(5000)
    single = TrainLoader(tokens, batch_size=4, block_size=8, order=order, seed=3)
    ranks = [
        TrainLoader(tokens, batch_size=2, block_size=8, order=order, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(50):  # 50 steps of 36 tokens wrap the 5000-token split too
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_random_windows_are_contiguous_in_range_and_seeded() -> None:
    tokens = ramp(300)
    a = take(TrainLoader(tokens, 8, 16, order="random", seed=1), 20)
    b = take(TrainLoader(tokens, 8, 16, order="random", seed=1), 20)
    c = take(TrainLoader(tokens, 8, 16, order="random", seed=2), 20)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))
    starts = set()
    for x, y in a:
        assert torch.equal(y, x + 1)  # a window of T+1 consecutive tokens
        assert torch.equal(x, x[:, :1] + torch.arange(16))
        assert int(y.max()) <= 299
        starts.update(x[:, 0].tolist())
    assert len(starts) > 50  # really random offsets, not a fixed few


def test_random_order_is_a_function_of_seed_and_step() -> None:
    tokens = ramp(300)
    loader = TrainLoader(tokens, 4, 8, order="random", seed=5)
    batches = take(loader, 6)
    jumped = TrainLoader(tokens, 4, 8, order="random", seed=5)
    jumped.load_state_dict({**jumped.state_dict(), "step": 4})
    assert torch.equal(jumped.next_batch()[0], batches[4][0])


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_train_state_round_trip_resumes_identically(order: str) -> None:
    tokens = ramp(700)
    loader = TrainLoader(tokens, 3, 10, order=order, seed=7)
    take(loader, 37)  # past one wrap of the sequential stream
    state = json.loads(json.dumps(loader.state_dict()))
    assert_plain(state)
    expected = take(loader, 15)
    resumed = TrainLoader(tokens, 3, 10, order=order, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, take(resumed, 15), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_rank_independent_state_restores_every_rank() -> None:
    tokens = ramp(900)
    ranks = [TrainLoader(tokens, 2, 6, rank=r, world_size=3) for r in range(3)]
    for loader in ranks:
        take(loader, 11)
    assert ranks[0].state_dict() == ranks[1].state_dict() == ranks[2].state_dict()
    resumed = TrainLoader(tokens, 2, 6, rank=2, world_size=3)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(resumed.next_batch()[0], ranks[2].next_batch()[0])


@pytest.mark.parametrize(
    "change", [{"batch_size": 4}, {"block_size": 9}, {"order": "random"}, {"n_tokens": 1}]
)
def test_resuming_with_other_settings_is_refused(change: dict[str, object]) -> None:
    loader = TrainLoader(ramp(500), 2, 8)
    take(loader, 3)
    with pytest.raises(DataError, match="cannot resume"):
        TrainLoader(ramp(500), 2, 8).load_state_dict({**loader.state_dict(), **change})


def test_split_shorter_than_one_chunk_is_refused() -> None:
    with pytest.raises(DataError, match=r"fewer than one chunk of 20 .*smaller batch"):
        TrainLoader(ramp(19), batch_size=2, block_size=4, world_size=2)
    TrainLoader(ramp(20), batch_size=2, block_size=4, world_size=2)
    with pytest.raises(DataError, match="fewer than one chunk"):
        TrainLoader(ramp(4), batch_size=2, block_size=4, order="random")
    with pytest.raises(DataError, match="fewer than one chunk of 10"):
        ValLoader(ramp(9), batch_size=2, block_size=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": "shuffled"}, "unknown loader order"),
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        ({"world_size": 0}, "world_size must be a positive integer"),
    ],
)
def test_bad_train_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        TrainLoader(ramp(100), 2, 4, **kwargs)


def test_bad_batch_size_and_tokens() -> None:
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        TrainLoader(ramp(100), 0, 4)
    with pytest.raises(DataError, match="1-D integer array"):
        TrainLoader(np.zeros((10, 10), dtype=np.uint16), 1, 4)


def starts_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(x[0, 0]) for x, _ in batches]


def test_paper_validation_continues_across_evaluations_and_wraps() -> None:
    # 5 chunks of 2 x 5 = 10 tokens, plus a 3-token tail.
    val = ValLoader(ramp(53), batch_size=2, block_size=4, protocol="paper", num_chunks=3)
    first = list(val.eval_batches())
    assert starts_of(first) == [0, 10, 20]
    x, y = first[1]
    assert x.tolist() == [[10, 11, 12, 13], [15, 16, 17, 18]]
    assert y.tolist() == [[11, 12, 13, 14], [16, 17, 18, 19]]
    assert starts_of(list(val.eval_batches())) == [30, 40, 0]
    assert starts_of(list(val.eval_batches())) == [10, 20, 30]


def test_fixed_validation_repeats_the_first_chunks() -> None:
    val = ValLoader(ramp(53), batch_size=2, block_size=4, protocol="fixed", num_chunks=2)
    assert starts_of(list(val.eval_batches())) == [0, 10]
    assert starts_of(list(val.eval_batches())) == [0, 10]
    whole = ValLoader(ramp(53), 2, 4, protocol="fixed", num_chunks=None)
    assert len(whole) == 5 and starts_of(list(whole.eval_batches())) == [0, 10, 20, 30, 40]
    assert len(ValLoader(ramp(53), 2, 4, protocol="fixed", num_chunks=0)) == 5


def test_validation_advances_even_if_an_evaluation_is_abandoned() -> None:
    val = ValLoader(ramp(100), 1, 4, num_chunks=4)
    next(iter(val.eval_batches()))
    assert starts_of(list(val.eval_batches())) == [20, 25, 30, 35]


def test_validation_state_round_trip() -> None:
    tokens = ramp(400)
    val = ValLoader(tokens, 2, 6, num_chunks=7)
    for _ in range(5):
        list(val.eval_batches())
    state = json.loads(json.dumps(val.state_dict()))
    assert_plain(state)
    expected = starts_of(list(val.eval_batches()))
    resumed = ValLoader(tokens, 2, 6, num_chunks=7)
    resumed.load_state_dict(state)
    assert starts_of(list(resumed.eval_batches())) == expected
    with pytest.raises(DataError, match="num_chunks"):
        ValLoader(tokens, 2, 6, num_chunks=8).load_state_dict(state)


def test_bad_validation_settings() -> None:
    with pytest.raises(DataError, match="unknown validation protocol"):
        ValLoader(ramp(100), 1, 4, protocol="nightly")
    with pytest.raises(DataError, match="needs a positive num_chunks"):
        ValLoader(ramp(100), 1, 4, protocol="paper", num_chunks=None)
    with pytest.raises(DataError, match="fewer than num_chunks=21"):
        ValLoader(ramp(100), 1, 4, protocol="fixed", num_chunks=21)
    assert len(ValLoader(ramp(100), 1, 4, protocol="paper", num_chunks=21)) == 21  # wraps
