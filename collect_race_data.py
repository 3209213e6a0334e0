"""Step 1a: expert driving data ("Order") from the pure-pursuit expert in carenv.py.

    python collect_race_data.py                          # small preset -> ./data_race/*.npz
    python collect_race_data.py --preset full            # the seed's ~1.9M frames
    python collect_race_data.py --episodes 20 --workers 2 --out-dir /tmp/race

Re-running the same command resumes: episodes already on disk are skipped.
"""
from carenv import Expert
from collection import collector_parser, run_collection


def main(args):
    return run_collection("race", Expert, args)


if __name__ == "__main__":
    main(collector_parser("race", __doc__.splitlines()[0]).parse_args())
