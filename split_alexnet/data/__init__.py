"""The input pipeline: decoding, statistics, the dataset and loader, augmentation, prepare, ImageNet layouts, demo data."""
