"""Ending a run early without losing it (train.preemption): durations, cadences, signals, time limits.

The end-to-end checks (a run stopped mid-epoch by SIGTERM or by its time limit resumes to the
uninterrupted run) live in tests/test_train.py beside the run they are compared with.
"""
import os
import signal

import pytest

from torch2flax.train.preemption import Every, Schedule, StopRequests, parse_duration


def test_durations_and_cadences_parse_and_errors_name_the_value():
    assert parse_duration("8h45m") == 8 * 3600 + 45 * 60
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("3600") == 3600 and parse_duration(90) == 90 and parse_duration("1d2h") == 93600
    for bad in ("8x", "h", "10m5", "-5m", "0"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_duration(bad)
    assert Every.parse("500") == Every(steps=500) and Every.parse(500) == Every(steps=500)
    assert Every.parse("10m") == Every(seconds=600.0) and str(Every.parse("1h")) == "3600 s"
    with pytest.raises(ValueError, match="N >= 1"):
        Every.parse("0")
    from torch2flax.errors import ConfigError

    for bad in ("8x", "nan"):  # a user's mistake (one line from the CLI), and NaN is no duration
        with pytest.raises(ConfigError, match=repr(bad)):
            parse_duration(bad)


def test_config_checks_the_preemption_fields_and_accepts_yaml_numbers(tmp_path):
    from torch2flax.train import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_every: 500\ntime_limit: 3600\nskip_bad_images: yes\nkeep_checkpoints: '3'\n"
                    "async_checkpoints: off\n")
    config = TrainConfig.from_file(path)
    assert (config.checkpoint_every, config.time_limit, config.skip_bad_images) == ("500", "3600", True)
    assert (config.keep_checkpoints, config.async_checkpoints) == (3, False)
    with pytest.raises(ValueError, match=r"config.keep_checkpoints=0: must be >= 1"):
        TrainConfig(keep_checkpoints=0)
    with pytest.raises(ValueError, match=r"config.time_limit='8 hours'"):
        TrainConfig(time_limit="8 hours")
    with pytest.raises(ValueError, match=r"config.checkpoint_every='-1'"):
        TrainConfig(checkpoint_every="-1")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_schedule_saves_on_its_cadence_and_stops_before_the_limit_with_room_for_a_checkpoint():
    clock = FakeClock()
    steps = Schedule(Every(steps=3), clock=clock)
    assert [s for s in range(1, 10) if steps.save_due(s)] == [3, 6, 9]
    timed = Schedule(Every(seconds=60), clock=clock)
    clock.now += 59
    assert not timed.save_due(1)
    clock.now += 1
    assert timed.save_due(2)
    timed.saved(4.0)
    assert not timed.save_due(3) and timed.save_seconds == 4.0

    clock.now = 0.0
    limited = Schedule(time_limit=100, clock=clock)
    for _ in range(3):  # steps of 10 s
        limited.step_done()
        clock.now += 10
    limited.saved(5.0)  # a 5 s checkpoint
    # margin: two steps and two checkpoints (2 x 10 + 2 x 5 = 30 s) before the limit
    clock.now = 69.0
    assert not limited.out_of_time()
    clock.now = 70.0
    assert limited.out_of_time()
    assert not Schedule(clock=clock).out_of_time()  # no limit


def test_first_signal_asks_for_a_stop_a_second_sigint_aborts_and_handlers_come_back(capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequests() as stop:
        assert not stop.requested and stop.exit_status == 0
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
        assert stop.requested and stop.reason == "SIGTERM" and stop.exit_status == 128 + signal.SIGTERM
        assert "SIGTERM received: finishing this step and writing a checkpoint" in capsys.readouterr().err
        stop.request("time limit")  # the first reason stays
        assert stop.reason == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    # The installed SIGINT handler, called as Python calls it: a KeyboardInterrupt delivered
    # asynchronously could land in whatever finalizer runs at that moment, not in this test.
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        with StopRequests() as stop:
            handler = signal.getsignal(signal.SIGINT)
            handler(signal.SIGINT, None)
            assert stop.reason == "SIGINT" and stop.exit_status == 130
            handler(signal.SIGINT, None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    with StopRequests() as stop:
        stop.request("time limit")
        assert stop.requested and stop.exit_status == 0  # a time limit is not a failure
        stop.adopt("SIGTERM")  # another process's reason does not replace this one's
        assert stop.reason == "time limit"
    other = StopRequests()
    other.adopt("SIGTERM")
    assert other.reason == "SIGTERM" and other.exit_status == 128 + signal.SIGTERM
