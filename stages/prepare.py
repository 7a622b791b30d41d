"""prepare: make the dataset ready (generate the synthetic one) and write the split index."""
from common import INDEX, log, setup, timed

from transfgu.data import prepare_index
from transfgu.io import write_json


def main():
    params = setup("prepare")
    d = params["dataset"]
    with timed("prepare"):
        index = prepare_index(d["name"], d["root"], int(params["seed"]), d.get("synthetic", {}))
        write_json(INDEX, index)
    log.info("indexed %s at %s: %s -> %s", d["name"], d["root"],
             {k: len(v) for k, v in index["splits"].items()}, INDEX)


if __name__ == "__main__":
    main()
