"""The CI run of the device-service fuzzer (tests/fuzz/device_fuzz.py): QUICK_INPUTS random topics,
statuses and envelopes through two receivers. No exception may escape ``Receiver.handle`` or
``tick``, nothing may be logged at ERROR, the memory allocated after each input stays under
device_fuzz.MEMORY_LIMIT, and afterwards both receivers still take a new full model.

The seed is fixed, so a failure reproduces with ``device_fuzz.fuzz(QUICK_INPUTS, seed=SEED)``;
``python tests/fuzz/device_fuzz.py --seconds N`` runs longer, with other seeds.
"""

import os

import device_fuzz

QUICK_INPUTS = int(os.environ.get("NNC_DEVICE_FUZZ_INPUTS", "400"))
SEED = 2026


def test_random_messages_do_not_end_or_bloat_the_device_service():
    report = device_fuzz.fuzz(QUICK_INPUTS, seed=SEED)
    print(report.summary())
    assert report.inputs == QUICK_INPUTS
    assert set(report.by_kind) == {"status", "data", "valid", "topic", "flood"}
    assert report.applied > 0 and report.live == 2  # the receivers still take what is valid
    assert not report.offenders, report.summary()
