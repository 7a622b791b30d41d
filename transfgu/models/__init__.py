"""Networks: the frozen DINO ViT backbone and the Segmenter mask-transformer decoder."""
