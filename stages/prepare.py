"""prepare: make the dataset ready (generate the synthetic one), check that it suits params.yaml, and write the
split index with the fingerprint of the dataset's files. dvc.yaml runs it on every `dvc repro` (always_changed):
it only lists and stats files, and when nothing changed it writes the same index, so nothing after it re-runs."""
from checks import check_index
from common import INDEX, log, setup, stage_main, timed

from transfgu.data.index import prepare_index
from transfgu.io import write_json


@stage_main
def main():
    params = setup("prepare")
    d = params["dataset"]
    with timed("prepare"):
        index = prepare_index(d, int(params["seed"]), check_images=bool(d.get("skip_bad", False)),
                              num_workers=int(d.get("num_workers", 0)))
        check_index(params, index)  # a training batch larger than the train split fails here, not in train
        write_json(INDEX, index)
    for split, bad in index["skipped"].items():
        if bad:
            log.warning("skipped %d unreadable %s images (dataset.skip_bad), e.g. %s", len(bad), split, bad[0])
    log.info("indexed %s at %s: %s, %d files, %.1f MB, fingerprint %s -> %s", d["name"], d["root"],
             {k: len(v) for k, v in index["splits"].items()}, index["fingerprint"]["files"],
             index["fingerprint"]["bytes"] / 2 ** 20, index["fingerprint"]["sha256"][:12], INDEX)


if __name__ == "__main__":
    main()
