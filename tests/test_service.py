"""SimulationService against a real LocalCluster of 8 worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
from distributed import Client, wait

from processes import start_scheduler, stopping, wait_until
from simcal.config import TargetSpec
from simcal.failures import NonFiniteLossError, lost_with_the_scheduler
from simcal.models import synthetic
from simcal.service import SimulationService, replicate_seed
from simcal.tasks import TargetLoss

TARGET = TargetSpec(name="y", observed="simcal.models.synthetic:observed", loss="mse")


def square(x: int) -> int:
    return x * x


def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


def snooze(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class RemoteGatherCounter:
    """Counts the client's remote gather requests (one per scheduler/worker transfer)."""

    def __init__(self, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = client._gather_remote

        async def counting(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return await original(*args, **kwargs)

        monkeypatch.setattr(client, "_gather_remote", counting)


def test_gather_keeps_input_order_over_1000_futures(client: Client) -> None:
    futures = client.map(square, range(1000), pure=False)
    assert SimulationService(client).gather(futures) == [x * x for x in range(1000)]


def test_gather_returns_failures_as_values(client: Client) -> None:
    service = SimulationService(client)
    ok = client.submit(square, 3, pure=False)
    failed = client.submit(fail, 4, pure=False)
    cancelled = client.submit(snooze, 3, pure=False)
    unfinished = client.submit(snooze, 3, pure=False)
    wait([ok, failed])
    cancelled.cancel()
    results = service.gather([ok, failed, cancelled, unfinished, ok], timeout=1.0)
    assert results[0] == 9 and results[4] == 9
    assert isinstance(results[1], ValueError) and "bad input 4" in str(results[1])
    assert isinstance(results[2], CancelledError)
    assert isinstance(results[3], TimeoutError)
    unfinished.cancel()


def spell(seconds: float) -> tuple[float, float]:
    started = time.time()
    time.sleep(seconds)
    return started, time.time()


def test_gather_waits_for_all_futures_at_once(client: Client) -> None:
    """Eight tasks on eight workers run side by side: each starts before any ends.

    Timestamps taken on the workers, not a wall-time bound, so load cannot fail it.
    """
    service = SimulationService(client)
    futures = [client.submit(spell, 3.0, pure=False) for _ in range(8)]
    spells = service.gather(futures)
    assert len(spells) == 8
    last_start, first_end = max(s for s, _ in spells), min(e for _, e in spells)
    assert last_start < first_end, "the tasks ran one after another, not at once"


def test_gather_fetches_finished_results_in_one_transfer(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    futures = client.map(square, range(500), pure=False) + client.map(fail, range(50), pure=False)
    wait(futures)
    counter = RemoteGatherCounter(client, monkeypatch)
    results = SimulationService(client).gather(futures)
    assert counter.calls == 1
    assert sum(isinstance(r, ValueError) for r in results) == 50
    # the per-future pattern this replaces pays one transfer per result
    for future in futures[:20]:
        future.result()
    assert counter.calls == 21


def test_gather_of_nothing_is_empty(client: Client) -> None:
    assert SimulationService(client).gather([]) == []


# replicate_seed(42, "7", 0..2): what every run with seed 42 draws for trial 7; a change of the
# function (or of numpy's SeedSequence) changes stored results, so it must be deliberate
PINNED_SEEDS = [223573532, 1151568543, 1041179136]


def test_replicate_seeds_are_reproducible_and_independent() -> None:
    """The same seeds in another process (its own hash seed: nothing may depend on
    ``hash()``) and in another release (pinned values); distinct across trials and seeds."""
    code = (
        "from simcal.service import replicate_seed; "
        "print([replicate_seed(42, '7', i) for i in range(3)])"
    )
    elsewhere = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert [replicate_seed(42, "7", i) for i in range(3)] == PINNED_SEEDS
    assert elsewhere.stdout.strip() == str(PINNED_SEEDS)
    seeds = {replicate_seed(42, trial, i) for trial in ("1", "2", "3") for i in range(50)}
    assert len(seeds) == 150
    assert replicate_seed(42, "7", 0) != replicate_seed(43, "7", 0)


def test_replicates_have_unique_keys_and_are_never_deduplicated(client: Client) -> None:
    service = SimulationService(client, run_id="r1")
    params = {"x": 0.5}
    first = service.submit_replicates(synthetic.simulate, params, 3, 1, trial_id="a")
    second = service.submit_replicates(synthetic.simulate, params, 3, 1, trial_id="b")
    assert [f.key for f in first] == ["sim-r1-a-0", "sim-r1-a-1", "sim-r1-a-2"]
    outputs = service.gather(first + second)
    arrays = [o.outputs[""] for o in outputs]
    assert not any(np.array_equal(arrays[0], other) for other in arrays[1:])
    again = service.gather(
        service.submit_replicates(synthetic.simulate, params, 1, 1, trial_id="a")
    )
    assert np.array_equal(again[0].outputs[""], arrays[0])


def test_aggregation_computes_loss_on_a_worker(client: Client) -> None:
    service = SimulationService(client)
    replicates = service.submit_replicates(
        "simcal.models.synthetic:simulate", {"x": 0.3, "y": 0.3}, 4, 5, trial_id="t"
    )
    [result] = service.gather([service.submit_aggregation(replicates, TARGET, trial_id="t")])
    assert isinstance(result, TargetLoss)
    assert result.target == "y" and 0 <= result.loss < 0.01
    assert result.replicate_seconds > 0


def test_non_finite_loss_is_an_error_value(client: Client) -> None:
    service = SimulationService(client)
    replicates = service.submit_replicates(
        synthetic.simulate, {"x": 0.1}, 2, 5, trial_id="nan", model_options={"nan_rate": 1.0}
    )
    [result] = service.gather([service.submit_aggregation(replicates, TARGET, trial_id="nan")])
    assert isinstance(result, NonFiniteLossError)


def test_aggregations_do_not_deadlock_when_they_outnumber_threads(client: Client) -> None:
    service = SimulationService(client)
    aggregations = []
    for trial in range(24):
        replicates = service.submit_replicates(
            synthetic.simulate,
            {"x": trial / 24},
            8,
            3,
            trial_id=str(trial),
            model_options={"duration": 0.01},
        )
        aggregations.append(service.submit_aggregation(replicates, TARGET, trial_id=str(trial)))
    results = service.gather(aggregations, timeout=120)
    assert all(isinstance(r, TargetLoss) for r in results)


def test_stream_yields_every_result_once_in_batches(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SimulationService(client)
    stream = service.stream()
    futures = client.map(snooze, [0.2] * 16, pure=False)
    stream.add(futures)
    counter = RemoteGatherCounter(client, monkeypatch)
    seen: list[str] = []
    batches = 0
    while stream.pending():
        batch = stream.next_batch(timeout=10)
        batches += 1 if batch else 0
        seen.extend(future.key for future, result in batch if result == 0.2)
    assert sorted(seen) == sorted(f.key for f in futures)
    assert counter.calls == batches < len(futures)


def test_a_replaced_scheduler_cancels_futures_with_a_reason_the_driver_reads(tmp_path) -> None:
    """Kubernetes replaces a deleted scheduler pod at the same address and the client
    reconnects to the new one. The futures it held are cancelled: their outcome must say the
    scheduler was lost, though the client is connected again by the time the driver reads it
    (the driver then re-enqueues the trial; a live run once counted 4 such trials failed)."""
    scheduler, address = start_scheduler(tmp_path)
    with stopping(scheduler) as procs, Client(address, timeout=60) as client:
        held = client.submit(snooze, 60, pure=False)  # no workers: it waits on the scheduler
        mine = client.submit(snooze, 60, pure=False)
        mine.cancel()
        scheduler.signal(signal.SIGKILL)
        scheduler.wait(30)
        port = int(address.rsplit(":", 1)[1])
        procs.append(start_scheduler(tmp_path, port=port)[0])
        wait_until(lambda: client.status == "running" and held.status == "cancelled", 90,
                   "the client to reconnect")
        lost, cancelled = SimulationService(client).gather([held, mine])
    assert isinstance(lost, CancelledError) and lost_with_the_scheduler(lost), repr(lost)
    assert isinstance(cancelled, CancelledError) and not lost_with_the_scheduler(cancelled)
