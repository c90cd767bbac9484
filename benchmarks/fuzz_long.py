"""A long fuzz run of the decoder: many more mutated conformance vectors than CI's quick run.

    python benchmarks/fuzz_long.py --seconds 3600            # an hour, a seed from the clock
    python benchmarks/fuzz_long.py --inputs 200000 --seed 7  # reproducible
    python benchmarks/fuzz_long.py --inputs 50000 --save crashes/

The mutators, targets, limits and checks are those of tests/fuzz/nnc_fuzz.py: every input must decode
or raise NNCError, within 2 s of CPU time and 64 MiB. Prints the inputs fuzzed, the decoded / refused
counts and every crash or offender (with the input's index: ``make_input(corpus, SEED, INDEX)`` remakes
it); with --save, offending inputs are written there as NAME-INDEX.nnc. Exit status 1 when any input
offended.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "fuzz"))

import nnc_fuzz  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, help="number of inputs (default: until --seconds)")
    parser.add_argument("--seconds", type=float, help="stop after this long (default 600 without --inputs)")
    parser.add_argument("--seed", type=int, help="seed of the inputs (default: from the clock; printed)")
    parser.add_argument("--python-share", type=float, default=nnc_fuzz.PYTHON_SHARE,
                        help="share of inputs on the pure-Python backend (default %(default)s)")
    parser.add_argument("--no-trace", action="store_true", help="no tracemalloc (faster; resident set still measured)")
    parser.add_argument("--save", metavar="DIR", help="write offending inputs into DIR")
    parser.add_argument("--conformance", default=os.environ.get("NNC_CONFORMANCE_DIR") or os.path.join(
        os.path.dirname(REPO), "shared", "conformance", "nncodec-2.1.3"), help="the conformance vectors")
    args = parser.parse_args(argv)
    if args.inputs is None and args.seconds is None:
        args.seconds = 600.0
    seed = args.seed if args.seed is not None else int(time.time()) % 1000000
    corpus = nnc_fuzz.Corpus(args.conformance)
    print("fuzzing %d conformance vectors, seed %d, %s" % (
        len(corpus.vectors), seed, "%d inputs" % args.inputs if args.inputs else "%g s" % args.seconds), flush=True)

    def progress(report):
        if report.inputs % 10000 == 0:
            print("  %d inputs, %.0f s, %d crashes, %d offenders" % (
                report.inputs, report.seconds, len(report.crashes), len(report.slow) + len(report.memory)), flush=True)

    report = nnc_fuzz.fuzz(corpus, count=args.inputs, seed=seed, seconds=args.seconds, python_share=args.python_share,
                           trace_memory=not args.no_trace, progress=progress, save_dir=args.save)
    print(report.summary())
    print("inputs fuzzed: %d; crashes found: %d" % (report.inputs, len(report.crashes)))
    return 1 if report.offenders else 0


if __name__ == "__main__":
    sys.exit(main())
