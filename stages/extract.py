"""extract: the crop [CLS] feature bank of the train split (docs/method.md section 1).

Every batch's crop features are kept in a piece (transfgu/pieces.py) as soon as they are computed; under torchrun
each rank takes every world-th batch still to do; rank 0 assembles the pieces in batch order, so the feature
bank is the same file whatever the number of processes. A re-run after an interruption computes only the
batches without a piece (docs/usage.md, "Interrupted runs")."""
import torch

from transfgu import dist
from transfgu.crops import THING_STUFF_WINDOW_SIZES, THINGS_ONLY_WINDOW_SIZES, crop_features, crop_windows
from transfgu.data.dataset import SplitDataset, images_on
from transfgu.feature_bank import batch_arrays, groups_of, write_feature_bank
from transfgu.io import size_mb
from transfgu.stage import log, run_stage


def main(stage):
    cfg, R, things_only = stage.config, stage.params.dataset.R, stage.params.things_only
    sizes = cfg.window_sizes
    if sizes == "auto":
        sizes = THINGS_ONLY_WINDOW_SIZES if things_only else THING_STUFF_WINDOW_SIZES
    dev, index, out = stage.device, stage.index, stage.out("feature_bank.h5")
    backbone, precision = stage.backbone(), stage.precision()
    data = SplitDataset(index, "train", 2 * R, decode=cfg.decode, root=stage.params.dataset.root)
    windows = crop_windows(2 * R // backbone.patch_size, sizes)
    groups = groups_of(things_only)
    log.info("%d train images at %d px, %d windows per image (sizes %s), crops at %d px%s, %s, %d process(es)",
             len(data), 2 * R, len(windows), list(sizes), R, ", things only" if things_only else "", precision,
             dist.world_size())
    key = stage.run_key([stage.dep("index.json")], precision=precision, device=dev.type)
    pieces = stage.pieces(out, data, cfg.batch_size, key)
    with stage.timed():
        for batch, save in pieces.batches("extract"):
            images = backbone.normalize(images_on(batch, dev).float() / 255)
            crops = crop_features(backbone, images, windows, R, cfg.crop_batch, things_only, cfg.thing_fraction,
                                  cfg.stuff_fraction, precision)
            save(batch_arrays(groups, crops))
        if dist.is_main():
            n_crops = write_feature_bank(
                out, pieces.paths(), groups, [e["id"] for e in index["splits"]["train"]],
                dict(R=R, arch=stage.params.backbone.arch, patch_size=backbone.patch_size, window_sizes=list(sizes),
                     things_only=things_only))
            pieces.remove()
            log.info("wrote %s: %s crops (%.1f per image), %.1f MB", out, n_crops,
                     sum(n_crops.values()) / max(len(data), 1), size_mb(out))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_stage("extract", main, distributed=True, keeps="finished batches")
