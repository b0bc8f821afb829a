"""The run folder under faults: a checkpoint or adapter interrupted at any step (an exception,
or a crash: os._exit in a forked child) leaves the previous or the new one complete, never
none; the lock keeps a second run out of a run's folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from fedinstruct import files
from fedinstruct.files import previous_copy
from fedinstruct.server.output import CHECKPOINT_DIR, LOCK_FILE, OutputInUse, RunOutput

BUILD_STEPS = ("save_file", "write_text", "_fsync_tree")  # before the new folder is complete
CRASHED = 17


class Fault(Exception):
    pass


def _tensors(server_round: int) -> dict[str, torch.Tensor]:
    return {"global/w": torch.full((4, 3), float(server_round)),
            "strategy/m": torch.arange(5.0) * server_round}


class _LoraConfigStub:
    """What save_peft_adapter needs of a peft LoraConfig (peft itself is slow to import)."""

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "adapter_config.json").write_text('{"r": 8}')


def _faulty(at: int, crash: bool, report: int | None) -> pytest.MonkeyPatch:
    """Every step of a save (each write, fsync, rename, swap, removal) counted; the `at`-th
    raises Fault, or with `crash` ends the process at once (its name written to `report`)."""
    patch = pytest.MonkeyPatch()
    count = [0]

    def wrap(name: str, real: Callable) -> Callable:
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == at:
                if crash:
                    os.write(report, name.encode())
                    os._exit(CRASHED)
                raise Fault(name)
            return real(*args, **kwargs)

        return step

    for owner, name in [(files.os, "replace"), (files.os, "rename"), (files.shutil, "rmtree"),
                        (files, "_exchange"), (files, "_fsync_dir"), (files, "_fsync_tree"),
                        (safetensors.torch, "save_file"), (Path, "write_text")]:
        patch.setattr(owner, name, wrap(name, getattr(owner, name)))
    return patch


def _interrupt(save: Callable[[], object], at: int, crash: bool) -> str | None:
    """Run `save` with a fault at its `at`-th step; the step's name (None: it finished first)."""
    if not crash:
        patch = _faulty(at, crash=False, report=None)
        try:
            save()
            return None
        except Fault as fault:
            return str(fault)
        finally:
            patch.undo()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its crash is a real one, no except or finally runs
        code = 1
        try:
            _faulty(at, crash=True, report=write)
            save()
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        step = pipe.read().decode()
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, CRASHED), f"the save failed at step {at} for another reason"
    return step if code == CRASHED else None


@pytest.fixture(params=["exchange", "two_renames"])
def swap(request, monkeypatch, tmp_path):
    """The replace swap: one atomic exchange (Linux), or two renames where there is none."""
    if request.param == "two_renames":
        monkeypatch.setattr(files, "_RENAMEAT2", None)
    else:
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        if not files._exchange(a, b):
            pytest.skip("no atomic exchange of folders on this OS / file system")
    return request.param


def _faults(save_previous, save_new, check, tmp_path, crash: bool) -> list[str]:
    """A fresh folder per step: the previous version saved, the new one interrupted there."""
    steps = []
    for at in range(1, 100):
        folder = tmp_path / f"at_{at}"
        save_previous(folder)
        step = _interrupt(lambda folder=folder: save_new(folder), at, crash)
        check(folder, step)
        if step is None:
            return steps
        steps.append(step)
    raise AssertionError("the save never finished")


def _checked_checkpoint(output: RunOutput, rounds: tuple[int, ...]) -> int:
    loaded = output.load_checkpoint()
    assert loaded is not None, "no checkpoint left"
    done, tensors, state = loaded
    assert done in rounds
    expected = _tensors(done)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    assert state["row"] == {"round": done}
    return done


@pytest.mark.parametrize("crash", [False, True], ids=["exception", "crash"])
def test_a_checkpoint_interrupted_at_any_step_leaves_the_previous_or_the_new(
        tmp_path, swap, crash):
    def save(folder: Path, server_round: int) -> None:
        RunOutput(folder).save_checkpoint(server_round, _tensors(server_round),
                                          {"row": {"round": server_round}})

    def check(folder: Path, step: str | None) -> None:
        output = RunOutput(folder)
        done = _checked_checkpoint(output, (1, 2))
        if not crash:  # an exception puts the previous checkpoint back in its place
            assert (folder / CHECKPOINT_DIR / "state.json").is_file()
        if step is None:
            assert done == 2
        elif step in BUILD_STEPS:
            assert done == 1, f"a fault at {step} lost the previous checkpoint"
        # the next checkpoint after the fault is saved, complete, and cleans up
        save(folder, 3)
        assert _checked_checkpoint(output, (3,)) == 3
        assert not previous_copy(folder / CHECKPOINT_DIR).exists()

    steps = _faults(lambda f: save(f, 1), lambda f: save(f, 2), check, tmp_path, crash)
    assert {"save_file", "write_text"} <= set(steps)
    assert ("_exchange" if swap == "exchange" else "replace") in steps


def test_load_checkpoint_finds_the_copy_an_interrupted_swap_left(tmp_path):
    output = RunOutput(tmp_path)
    output.save_checkpoint(1, _tensors(1), {"row": {"round": 1}})
    folder = tmp_path / CHECKPOINT_DIR
    os.replace(folder, previous_copy(folder))  # the state between the two renames of a swap
    assert output.checkpoint_folder() == previous_copy(folder)
    assert _checked_checkpoint(output, (1,)) == 1
    output.save_checkpoint(2, _tensors(2), {"row": {"round": 2}})
    assert _checked_checkpoint(output, (2,)) == 2
    assert not previous_copy(folder).exists()


def test_no_checkpoint_is_none(tmp_path):
    output = RunOutput(tmp_path)
    assert output.checkpoint_folder() is None and output.load_checkpoint() is None
    (tmp_path / CHECKPOINT_DIR).mkdir()  # a folder without its files is no checkpoint
    (tmp_path / CHECKPOINT_DIR / "state.json").write_text(json.dumps({"round": 1}))
    assert output.load_checkpoint() is None


@pytest.mark.parametrize("crash", [False, True], ids=["exception", "crash"])
def test_adapters_final_is_never_missing(tmp_path, swap, crash):
    def save(folder: Path, server_round: int) -> None:
        state = {"w": torch.full((2, 2), float(server_round))}
        RunOutput(folder).save_adapter(server_round, state, _LoraConfigStub())

    def final_round(folder: Path) -> int:
        final = folder / "adapters" / "final"
        if swap == "two_renames" and not final.exists():  # no atomic swap: the old copy waits
            final = previous_copy(final)
        assert (final / "adapter_config.json").is_file(), "adapters/final is missing"
        return int(load_file(str(final / "adapter_model.safetensors"))["w"][0, 0])

    def check(folder: Path, step: str | None) -> None:
        assert final_round(folder) in ((2,) if step is None else (1, 2))
        if swap == "exchange":
            assert (folder / "adapters" / "final" / "adapter_config.json").is_file()

    _faults(lambda f: save(f, 1), lambda f: save(f, 2), check, tmp_path, crash)


def test_a_second_lock_on_the_folder_fails_at_once_naming_the_holder(tmp_path):
    output = RunOutput(tmp_path / "run")
    in_use = rf"{output.folder} is in use by another run \(pid {os.getpid()} on "
    with output.lock(), pytest.raises(OutputInUse, match=in_use), RunOutput(output.folder).lock():
        pass
    with RunOutput(tmp_path / "run").lock():  # released at the end of the run
        assert (output.folder / LOCK_FILE).read_text().startswith(f"{os.getpid()} ")


def test_the_lock_of_a_process_that_died_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from fedinstruct.server.output import RunOutput\n"
         "with RunOutput(sys.argv[1]).lock():\n    print('locked', flush=True)\n"
         "    time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUse, match=rf"pid {holder.pid} on "), RunOutput(
                tmp_path).lock():
            pass
    finally:
        holder.kill()
        holder.wait()
    with RunOutput(tmp_path).lock():
        pass
