"""extract: the crop [CLS] feature bank of the train split (METHOD.md section 1)."""
import h5py
import torch
from tqdm import tqdm

from common import FEATURE_BANK, INDEX, backbone_of, device, loader, log, setup, size_mb, timed

from transfgu.crops import THING_STUFF_WINDOW_SIZES, THINGS_ONLY_WINDOW_SIZES, crop_features, crop_windows
from transfgu.data import SplitDataset, things_only as dataset_things_only
from transfgu.io import FeatureBankWriter, atomic_output, read_json, write_image_ids


def main():
    params = setup("extract")
    cfg, R = params["extract"], int(params["dataset"]["R"])
    things_only = dataset_things_only(params["dataset"])
    sizes = cfg["window_sizes"]
    if sizes == "auto":
        sizes = THINGS_ONLY_WINDOW_SIZES if things_only else THING_STUFF_WINDOW_SIZES
    dev = device()
    backbone = backbone_of(params, dev)
    index = read_json(INDEX)
    data = SplitDataset(index, "train", 2 * R)
    windows = crop_windows(2 * R // backbone.patch_size, sizes)
    log.info("%d train images at %d px, %d windows per image (sizes %s), crops at %d px%s",
             len(data), 2 * R, len(windows), list(sizes), R, ", things only" if things_only else "")
    groups = ("thing",) if things_only else ("thing", "stuff")
    n_crops = {g: 0 for g in groups}
    with timed("extract"), atomic_output(FEATURE_BANK) as tmp, h5py.File(tmp, "w") as h5:
        writer = FeatureBankWriter(h5, groups, backbone.embed_dim)
        for batch in tqdm(loader(data, int(cfg["batch_size"]), int(cfg["num_workers"])), desc="extract"):
            images = backbone.normalize(batch["image"].to(dev).float() / 255)
            things, stuff = crop_features(backbone, images, windows, R, int(cfg["crop_batch"]), things_only,
                                          float(cfg["thing_fraction"]), float(cfg["stuff_fraction"]))
            for group, feats in zip(groups, (things, stuff)):
                for f in feats:
                    writer.append(group, f.numpy())
                    n_crops[group] += len(f)
        writer.close()
        write_image_ids(h5, [e["id"] for e in index["splits"]["train"]])
        h5.attrs.update(R=R, arch=params["backbone"]["arch"], patch_size=backbone.patch_size,
                        window_sizes=list(sizes), things_only=things_only)
    log.info("wrote %s: %s crops (%.1f per image), %.1f MB", FEATURE_BANK, n_crops,
             sum(n_crops.values()) / max(len(data), 1), size_mb(FEATURE_BANK))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
