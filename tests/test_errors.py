"""Error lines say what was refused and why in whole words; torch's long text stays in the
exception chain (shown with ``debug=true``)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from atx.checkpoints import load_state_dict
from atx.errors import AtxError, reason
from atx.models.torchvision_models import load_pretrained
from atx.resume import newest_checkpoint


class Payload:
    def __reduce__(self) -> tuple:
        return os.getcwd, ()  # harmless if it ever ran; weights_only refuses it anyway


@pytest.fixture
def poisoned(tmp_path):
    """A torch file holding a pickled object next to its tensors."""
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload()}, path)
    return path


WHY = ("UnpicklingError: Trying to load unsupported GLOBAL posix.getcwd whose module posix is"
       " blocked")


def test_reason_is_torch_s_specific_line_not_its_advice(poisoned) -> None:
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(poisoned, weights_only=True)
    error = info.value
    assert str(error).startswith("Weights only load failed. In PyTorch 2.6")  # what torch says
    assert reason(error) == WHY


def test_reason_cuts_long_text_between_words() -> None:
    text = "the checkpoint " + "payload " * 60
    why = reason(ValueError(text + "\nsecond line"), limit=100)
    assert why.endswith(" payload ...") and len(why) <= len("ValueError: ") + 104
    assert reason(ValueError("short.")) == "ValueError: short" and reason(KeyError()) == "KeyError"


def load_torchvision_weights(path) -> None:
    load_pretrained(torch.nn.Linear(2, 2), path)


@pytest.mark.parametrize("load", [load_state_dict, load_torchvision_weights])
def test_refusal_lines_end_with_the_whole_reason(poisoned, load) -> None:
    with pytest.raises(AtxError) as info:
        load(poisoned)
    message = str(info.value)
    assert message.endswith(f"(weights_only=True rejected it: {WHY})") and "\n" not in message
    assert "Weights only load failed" in str(info.value.__cause__)  # for debug=true


def test_unreadable_checkpoint_lines_are_whole(tmp_path, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04" * 64)  # a torn zip
    assert newest_checkpoint(tmp_path) is None
    err = capsys.readouterr().err
    assert "(RuntimeError: PytorchStreamReader failed reading zip archive: " in err
    line = next(ln for ln in err.splitlines() if "skipping unreadable" in ln)
    assert line.endswith(" ...); trying the previous one")  # torch's long text cut between words
