"""prepare: make the dataset ready (generate the synthetic one) and write the split index."""
from common import INDEX, log, setup, timed

from transfgu.data.index import prepare_index
from transfgu.io import write_json


def main():
    params = setup("prepare")
    d = params["dataset"]
    with timed("prepare"):
        index = prepare_index(d, int(params["seed"]), check_images=bool(d.get("skip_bad", False)),
                              num_workers=int(d.get("num_workers", 0)))
        write_json(INDEX, index)
    for split, bad in index["skipped"].items():
        if bad:
            log.warning("skipped %d unreadable %s images (dataset.skip_bad), e.g. %s", len(bad), split, bad[0])
    log.info("indexed %s at %s: %s -> %s", d["name"], d["root"],
             {k: len(v) for k, v in index["splits"].items()}, INDEX)


if __name__ == "__main__":
    main()
