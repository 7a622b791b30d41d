"""prepare: make the dataset ready (generate the synthetic one), check that it suits params.yaml, and write the
split index with the fingerprint of the dataset's files. dvc.yaml runs it on every `dvc repro` (always_changed):
it only lists and stats files, and when nothing changed it writes the same index, so nothing after it re-runs."""
from transfgu.crf import require_pydensecrf
from transfgu.data.index import prepare_index
from transfgu.io import write_json
from transfgu.stage import log, run_stage


def main(stage):
    d, out = stage.params.dataset, stage.out("index.json")
    if stage.params.evaluate.crf:  # evaluate would stop at its start, after the whole pipeline: say it now
        require_pydensecrf()
    with stage.timed():
        index = prepare_index(d, stage.params.seed, check_images=d.skip_bad, num_workers=d.num_workers)
        stage.params.check_index(index)  # a training batch larger than the train split fails here, not in train
        write_json(out, index)
    for split, bad in index["skipped"].items():
        if bad:
            log.warning("skipped %d unreadable %s images (dataset.skip_bad), e.g. %s", len(bad), split, bad[0])
    log.info("indexed %s at %s: %s, %d files, %.1f MB, fingerprint %s -> %s", d.name, d.root,
             {k: len(v) for k, v in index["splits"].items()}, index["fingerprint"]["files"],
             index["fingerprint"]["bytes"] / 2 ** 20, index["fingerprint"]["sha256"][:12], out)


if __name__ == "__main__":
    run_stage("prepare", main)
