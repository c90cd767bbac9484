"""The CI fuzz run: QUICK_INPUTS mutated conformance vectors (tests/fuzz/nnc_fuzz.py), each of which must
decode or raise NNCError, within nnc_fuzz.TIME_LIMIT seconds of CPU time and nnc_fuzz.MEMORY_LIMIT bytes,
through every target: the whole-buffer decoders and the stream decoders, with and without slice mode.

The inputs are the same in every run (a fixed seed), so a failure names inputs that reproduce:
``nnc_fuzz.make_input(corpus, SEED, index)``. benchmarks/fuzz_long.py runs more, with other seeds.
"""

import os

import nnc_fuzz

QUICK_INPUTS = int(os.environ.get("NNC_FUZZ_INPUTS", "20000"))
SEED = 2026


def test_mutated_conformance_vectors_decode_or_raise_nncerror(conformance_dir):
    corpus = nnc_fuzz.Corpus(str(conformance_dir))
    report = nnc_fuzz.fuzz(corpus, count=QUICK_INPUTS, seed=SEED)
    print(report.summary())
    assert report.inputs == QUICK_INPUTS
    # Every decoder entry point and both backends were exercised.
    assert set(report.by_target) == set(nnc_fuzz.TARGETS)
    assert report.by_backend.get("cython", 0) > 0 or "cython" not in nnc_fuzz.core_backend.available()
    assert report.by_backend.get("python", 0) > 0
    assert report.decoded > 0 and report.refused > 0
    assert not report.offenders, report.summary()
