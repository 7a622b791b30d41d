"""Datasets, one module per concern:

- tasks.py     which (dataset, granularity) pairs exist: concept counts, class names and kinds, label maps
- adapters.py  each dataset's on-disk layout, listed as {"id", "image", "label"} entries
- labels.py    the raw-label maps (COCO-Stuff 27 / 171, COCO-80, Cityscapes, VOC, LIP)
- index.py     the split index `prepare` writes (outputs/index.json)
- images.py    decoding image and label files; collecting image files
- dataset.py   SplitDataset, what the stages iterate over
- loaders.py   DataLoaders over whole batches of a split (a rank's share of them)
- synthetic.py the built-in synthetic scene generator
"""
