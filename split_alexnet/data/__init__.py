"""The input pipeline: decoding, statistics, the dataset and loader, augmentation, prepare (its
tasks and subsets), ImageNet layouts, demo data."""
