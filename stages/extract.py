"""extract: the crop [CLS] feature bank of the train split (docs/method.md section 1).

Every batch's crop features are kept in a piece (transfgu/shards.py) as soon as they are computed; under torchrun
each rank takes every world-th batch still to do; rank 0 assembles the pieces in batch order, so the feature
bank is the same file whatever the number of processes. A re-run after an interruption computes only the
batches without a piece (README, "Interrupted runs")."""
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from common import FEATURE_BANK, INDEX, log, run_key, setup, size_mb, stage_main, timed
from runtime import backbone_of, decode_of, device, precision_of, workers_of

from transfgu import dist, faults
from transfgu.crops import THING_STUFF_WINDOW_SIZES, THINGS_ONLY_WINDOW_SIZES, crop_features, crop_windows
from transfgu.data.dataset import SplitDataset, images_on
from transfgu.data.tasks import dataset_is_things_only
from transfgu.feature_bank import batch_arrays, groups_of, write_feature_bank
from transfgu.io import read_json
from transfgu.pieces import BatchPieces


@record
@stage_main
def main():
    params = setup("extract")
    cfg, R = params["extract"], int(params["dataset"]["R"])
    things_only = dataset_is_things_only(params["dataset"])
    sizes = cfg["window_sizes"]
    if sizes == "auto":
        sizes = THINGS_ONLY_WINDOW_SIZES if things_only else THING_STUFF_WINDOW_SIZES
    dev = device()
    backbone = backbone_of(params, dev)
    precision = precision_of(params, "extract", dev)
    index = read_json(INDEX)
    data = SplitDataset(index, "train", 2 * R, decode=decode_of(params, "extract"), param="extract.decode")
    windows = crop_windows(2 * R // backbone.patch_size, sizes)
    groups = groups_of(things_only)
    log.info("%d train images at %d px, %d windows per image (sizes %s), crops at %d px%s, %s, %d process(es)",
             len(data), 2 * R, len(windows), list(sizes), R, ", things only" if things_only else "", precision,
             dist.world_size())
    key = run_key("extract", params, [INDEX], precision=precision, device=dev.type)
    pieces = BatchPieces(FEATURE_BANK, data, int(cfg["batch_size"]), workers_of(params, "extract"), key, "extract",
                         on_point=faults.hook("extract"))
    with timed("extract"):
        for batch, save in pieces.batches("extract"):
            images = backbone.normalize(images_on(batch, dev).float() / 255)
            crops = crop_features(backbone, images, windows, R, int(cfg["crop_batch"]), things_only,
                                  float(cfg["thing_fraction"]), float(cfg["stuff_fraction"]), precision)
            save(batch_arrays(groups, crops))
        if dist.is_main():
            n_crops = write_feature_bank(
                FEATURE_BANK, pieces.paths(), groups, [e["id"] for e in index["splits"]["train"]],
                dict(R=R, arch=params["backbone"]["arch"], patch_size=backbone.patch_size, window_sizes=list(sizes),
                     things_only=things_only))
            pieces.remove()
            log.info("wrote %s: %s crops (%.1f per image), %.1f MB", FEATURE_BANK, n_crops,
                     sum(n_crops.values()) / max(len(data), 1), size_mb(FEATURE_BANK))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
