"""Power loss on the device (issue 16): ``apply``, ``decode --stream`` of a full model and the MQTT
receiver's full-model writer, each killed (SIGKILL) in a child process at random points of its work.

After every kill the model file is the old one or the new one, byte for byte; the next run leaves
the new model; and after it the device's folder holds what an uninterrupted run leaves, nothing
more. The trials are benchmarks/power_loss.py's (100 kills per scenario there, a few here).
"""

import os
import random
import sys

import pytest

from conftest import CONFORMANCE_DIR, REPO

sys.path.insert(0, os.path.join(str(REPO), "benchmarks"))
import power_loss  # noqa: E402

KILLS = {"apply": 10, "download": 10, "receiver": 4}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    if not (CONFORMANCE_DIR / "p1_real_silero_vad.nnc").exists():
        pytest.skip("conformance vectors not found in %s" % CONFORMANCE_DIR)
    return power_loss.prepare(str(tmp_path_factory.mktemp("power-loss")), tuple(KILLS))


@pytest.mark.parametrize("name", sorted(KILLS))
def test_a_killed_writer_leaves_the_old_or_the_new_model_and_the_next_run_recovers(scenarios, tmp_path, name):
    outcome = power_loss.run_trials(scenarios[name], KILLS[name], random.Random(name), str(tmp_path / "device"))
    assert outcome.violations == []
    assert outcome.old + outcome.new == KILLS[name]
