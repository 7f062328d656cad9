"""Stop signals (fedsoda_mpi/signals.py): which signal a rank names, and what it tells the user to run next."""
import os
import signal

import pytest

from fedsoda_mpi.signals import Terminated, install_stop_handlers, resume_hint


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_sigterm_sigint_and_sighup_abandon_the_round_naming_the_signal(sig):
    """Ctrl-C (SIGINT) and a closed terminal (SIGHUP) end a rank like SIGTERM, and the rank says which it was
    (the log used to say SIGTERM after a Ctrl-C); a second signal during the clean-up is ignored."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    try:
        install_stop_handlers()
        with pytest.raises(Terminated) as e:
            os.kill(os.getpid(), sig)
        assert e.value.signal == signal.Signals(sig).name
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_the_resume_hint_names_the_newest_checkpoint_or_says_there_is_none(tmp_path):
    """Before round 1's checkpoint exists, 'continue from the last checkpoint' was wrong advice."""
    assert resume_hint(tmp_path) == "no checkpoint exists yet, so run the same command again to start over"
    for rnd in (3, 4):
        (tmp_path / "checkpoints" / f"round{rnd:05d}").mkdir(parents=True)
    assert resume_hint(tmp_path) == "run the same command with resume=auto to continue from the checkpoint of round 4"
    assert resume_hint(None).startswith("no checkpoint")
